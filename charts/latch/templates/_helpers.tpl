{{/* Names ------------------------------------------------------------------ */}}

{{- define "latch.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "latch.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "latch.controlPlane.fullname" -}}
{{- printf "%s-control-plane" (include "latch.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "latch.injector.fullname" -}}
{{- printf "%s-injector" (include "latch.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels ----------------------------------------------------------------- */}}

{{- define "latch.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "latch.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: latch
{{- end -}}

{{/* selectorLabels takes (dict "ctx" $ "component" "control-plane"). */}}
{{- define "latch.selectorLabels" -}}
app.kubernetes.io/name: {{ include "latch.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Image -------------------------------------------------------------------- */}}

{{- define "latch.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* Identity --------------------------------------------------------------- */}}

{{- define "latch.controlPlane.spiffeID" -}}
{{- default (printf "spiffe://%s/ns/%s/sa/%s" .Values.trustDomain .Release.Namespace (include "latch.controlPlane.fullname" .)) .Values.controlPlane.spiffeID -}}
{{- end -}}

{{- define "latch.controlPlane.address" -}}
{{- printf "%s.%s.svc:%d" (include "latch.controlPlane.fullname" .) .Release.Namespace (int .Values.controlPlane.port) -}}
{{- end -}}

{{/* Pod security: the same hardening on every pod and container. */}}

{{- define "latch.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "latch.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
privileged: false
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* The Workload API socket volume. */}}
{{- define "latch.workloadAPIVolume" -}}
- name: spiffe-workload-api
{{- if eq .Values.workloadAPI.source "csi" }}
  csi:
    driver: {{ .Values.workloadAPI.csiDriver }}
    readOnly: true
{{- else }}
  hostPath:
    path: {{ .Values.workloadAPI.hostPath }}
    type: Directory
{{- end }}
{{- end -}}

{{- define "latch.workloadAPIEnv" -}}
- name: SPIFFE_ENDPOINT_SOCKET
  value: unix:///spiffe-workload-api/{{ .Values.workloadAPI.socketName }}
{{- end -}}

{{/* Default soft spread of replicas across nodes; takes (dict "ctx" $ "component" ... "values" ...). */}}
{{- define "latch.topologySpread" -}}
{{- if .values.topologySpreadConstraints }}
{{- toYaml .values.topologySpreadConstraints }}
{{- else -}}
- maxSkew: 1
  topologyKey: kubernetes.io/hostname
  whenUnsatisfiable: ScheduleAnyway
  labelSelector:
    matchLabels:
      {{- include "latch.selectorLabels" (dict "ctx" .ctx "component" .component) | nindent 6 }}
{{- end }}
{{- end -}}
