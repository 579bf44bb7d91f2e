package main

import (
	"fmt"
	"log/slog"
	"slices"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"latch.dev/latch/proxy"
)

// A sidecar can hold a policy that does nothing: the control plane has no
// declaration for its identity (it is served an empty one), or a listener's
// allow-list can match no peer latch would ever verify. Both look healthy
// from outside (the sidecar runs, the policy applied), so they are said
// loudly: a WARN at every apply, a line in /status, a metric, and for the
// empty policy /readyz (see docs/operations.md, "No policy for this
// identity").

// errNoPolicy explains an empty policy: what the sidecar does not do, and
// what to declare.
func errNoPolicy(cfg *proxy.Config, self spiffeid.ID) error {
	from := cfg.Source
	switch {
	case cfg.Source == "xds":
		from = "the control plane"
	case cfg.Source == "xds-state":
		from = "the control plane's last policy (saved in --state-dir)"
	case strings.HasPrefix(cfg.Source, "file:"):
		from = strings.TrimPrefix(cfg.Source, "file:")
	}
	return fmt.Errorf("no policy for %s: %s declares no listener for this identity, so this sidecar admits no peer and reaches no upstream "+
		"(declare a ServicePolicy whose spiffeID is %s)", self, from, self)
}

// policyEmpty reports whether cfg has no listener at all.
func policyEmpty(cfg *proxy.Config) bool {
	return len(cfg.Inbound) == 0 && len(cfg.Outbound) == 0
}

// admitsNobody lists the inbound listeners of cfg whose allow-list matches
// no peer a sidecar of trust domain td can verify: an empty list (deny all),
// or rules that all name trust domains other than td and those the listener
// federates with, whose peers fail verification before the allow-list is
// asked.
func admitsNobody(cfg *proxy.Config, td spiffeid.TrustDomain) []string {
	var out []string
	for _, in := range cfg.Inbound {
		rules := in.Allow.Rules()
		if len(rules) == 0 {
			out = append(out, fmt.Sprintf("inbound listener %q admits nobody: its allow-list is empty (deny all)", in.Name))
			continue
		}
		var others []string
		for _, r := range rules {
			if r.TrustDomain() == td || slices.Contains(in.FederatesWith, r.TrustDomain()) {
				others = nil
				break
			}
			others = append(others, r.TrustDomain().Name())
		}
		if others != nil {
			slices.Sort(others)
			out = append(out, fmt.Sprintf("inbound listener %q admits nobody: every allow rule names another trust domain (%s) than this sidecar's, %s, "+
				"and the listener federates with none of them (federatesWith)", in.Name, strings.Join(slices.Compact(others), ", "), td.Name()))
		}
	}
	return out
}

// policyWarnings is every reason cfg does less than it seems to.
func policyWarnings(cfg *proxy.Config, self spiffeid.ID) []string {
	if cfg == nil {
		return nil
	}
	if policyEmpty(cfg) {
		return []string{errNoPolicy(cfg, self).Error()}
	}
	return admitsNobody(cfg, self.TrustDomain())
}

// logPolicyWarnings says at WARN what policyWarnings finds in a config just
// applied.
func logPolicyWarnings(log *slog.Logger, cfg *proxy.Config, self spiffeid.ID) {
	for _, w := range policyWarnings(cfg, self) {
		msg := "policy admits nobody"
		if policyEmpty(cfg) {
			msg = "no policy for this identity"
		}
		log.Warn(msg, "spiffe_id", self.String(), "version", cfg.Version, "source", cfg.Source, "reason", w)
	}
}

// MetricPolicyListeners is the number of listeners of the running policy.
const MetricPolicyListeners = "latch_policy_listeners"

// registerPolicyMetrics exports the running policy's listeners by direction;
// both 0 is a sidecar with no policy (before the first one, or an empty one).
func registerPolicyMetrics(reg prometheus.Registerer, srv *proxy.Server) error {
	for _, dir := range []proxy.Direction{proxy.DirectionInbound, proxy.DirectionOutbound} {
		g := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name:        MetricPolicyListeners,
			Help:        "Listeners in the running policy, by direction; 0 in both directions means the sidecar serves nothing (no policy yet, or none declared for its identity).",
			ConstLabels: prometheus.Labels{"direction": string(dir)},
		}, func() float64 {
			cfg := srv.Current()
			switch {
			case cfg == nil:
				return 0
			case dir == proxy.DirectionInbound:
				return float64(len(cfg.Inbound))
			}
			return float64(len(cfg.Outbound))
		})
		if err := reg.Register(g); err != nil {
			return fmt.Errorf("registering %s: %w", MetricPolicyListeners, err)
		}
	}
	return nil
}
