package inject

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"mime"
	"net/http"

	admissionv1 "k8s.io/api/admission/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// URL paths of the webhook. The chart registers two webhooks: one for
// namespaces labelled latch.dev/inject=enabled (PathNamespace) and one for
// pods elsewhere that opt in by annotation (PathPod).
const (
	PathNamespace = "/inject/namespace"
	PathPod       = "/inject/pod"
	PathHealth    = "/healthz"
)

// MaxRequestBytes bounds an AdmissionReview body. The API server's own
// request limit is 3 MiB; a pod cannot be larger than that.
const MaxRequestBytes = 3 << 20

// Webhook serves AdmissionReview v1 requests. Its zero value is not usable;
// build it with NewWebhook.
type Webhook struct {
	cfg Config
	log *slog.Logger
	mux *http.ServeMux
}

// NewWebhook validates cfg and returns the handler for PathNamespace,
// PathPod and PathHealth.
func NewWebhook(cfg Config, log *slog.Logger) (*Webhook, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("injector config: %w", err)
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	w := &Webhook{cfg: cfg, log: log, mux: http.NewServeMux()}
	w.mux.Handle("POST "+PathNamespace, w.review(OptInNamespace))
	w.mux.Handle("POST "+PathPod, w.review(OptInPod))
	w.mux.HandleFunc("GET "+PathHealth, func(rw http.ResponseWriter, _ *http.Request) {
		rw.Header().Set("Content-Type", "text/plain; charset=utf-8")
		_, _ = io.WriteString(rw, "ok\n")
	})
	return w, nil
}

func (w *Webhook) ServeHTTP(rw http.ResponseWriter, r *http.Request) { w.mux.ServeHTTP(rw, r) }

func (w *Webhook) review(how OptIn) http.Handler {
	return http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		if mt, _, err := mime.ParseMediaType(r.Header.Get("Content-Type")); err != nil || mt != "application/json" {
			http.Error(rw, "want Content-Type application/json", http.StatusUnsupportedMediaType)
			return
		}
		body, err := io.ReadAll(http.MaxBytesReader(rw, r.Body, MaxRequestBytes))
		if err != nil {
			var tooBig *http.MaxBytesError
			if errors.As(err, &tooBig) {
				http.Error(rw, "AdmissionReview larger than 3 MiB", http.StatusRequestEntityTooLarge)
				return
			}
			http.Error(rw, "reading AdmissionReview: "+err.Error(), http.StatusBadRequest)
			return
		}
		var review admissionv1.AdmissionReview
		if err := json.Unmarshal(body, &review); err != nil {
			http.Error(rw, "decoding AdmissionReview: "+err.Error(), http.StatusBadRequest)
			return
		}
		if review.Request == nil {
			http.Error(rw, "AdmissionReview without a request", http.StatusBadRequest)
			return
		}
		resp := w.admit(review.Request, how)
		resp.UID = review.Request.UID
		out, err := json.Marshal(admissionv1.AdmissionReview{
			TypeMeta: metav1.TypeMeta{APIVersion: "admission.k8s.io/v1", Kind: "AdmissionReview"},
			Response: resp,
		})
		if err != nil {
			http.Error(rw, "encoding AdmissionReview: "+err.Error(), http.StatusInternalServerError)
			return
		}
		rw.Header().Set("Content-Type", "application/json")
		_, _ = rw.Write(out)
	})
}

var podResource = metav1.GroupVersionResource{Version: "v1", Resource: "pods"}

// admit decides one request. Anything that is not the creation of a pod is
// admitted untouched: the webhook's rules should not send it, and refusing it
// would only break clusters whose rules were widened by hand.
func (w *Webhook) admit(req *admissionv1.AdmissionRequest, how OptIn) *admissionv1.AdmissionResponse {
	allow := &admissionv1.AdmissionResponse{Allowed: true}
	if req.Resource != podResource || req.SubResource != "" || req.Operation != admissionv1.Create {
		return allow
	}
	var pod corev1.Pod
	if err := json.Unmarshal(req.Object.Raw, &pod); err != nil {
		return refuse(http.StatusBadRequest, fmt.Sprintf("latch injector: decoding pod: %v", err))
	}
	name := pod.Name
	if name == "" {
		name = pod.GenerateName
	}
	log := w.log.With("namespace", req.Namespace, "pod", name, "uid", string(req.UID))
	res, err := w.cfg.Mutate(&pod, how)
	if err != nil {
		log.Warn("pod refused", "reason", err.Error())
		return refuse(http.StatusBadRequest, "latch injector: "+err.Error())
	}
	allow.Warnings = res.Warnings
	if len(res.Patch) == 0 {
		log.Debug("pod admitted without injection", "reason", res.Skipped)
		return allow
	}
	patch, err := json.Marshal(res.Patch)
	if err != nil {
		log.Error("encoding patch", "reason", err.Error())
		return refuse(http.StatusInternalServerError, "latch injector: encoding patch: "+err.Error())
	}
	pt := admissionv1.PatchTypeJSONPatch
	allow.Patch, allow.PatchType = patch, &pt
	log.Info("sidecar injected")
	return allow
}

func refuse(code int32, msg string) *admissionv1.AdmissionResponse {
	reason := metav1.StatusReasonBadRequest
	if code >= 500 {
		reason = metav1.StatusReasonInternalError
	}
	return &admissionv1.AdmissionResponse{
		Allowed: false,
		Result:  &metav1.Status{Status: metav1.StatusFailure, Message: msg, Reason: reason, Code: code},
	}
}
