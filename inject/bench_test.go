package inject_test

import (
	"testing"

	"latch.dev/latch/inject"
)

// BenchmarkMutate is the injector's work per pod, without HTTP: parse the
// annotations, build the sidecar and the patch.
func BenchmarkMutate(b *testing.B) {
	cfg := baseConfig()
	pod := fixturePod(b)
	b.ReportAllocs()
	for b.Loop() {
		res, err := cfg.Mutate(pod, inject.OptInNamespace)
		if err != nil || len(res.Patch) == 0 {
			b.Fatal(err)
		}
	}
}

// BenchmarkReviewHTTPS is one AdmissionReview round trip over the real
// server on loopback, on a kept-alive TLS connection, as the API server
// makes it.
func BenchmarkReviewHTTPS(b *testing.B) {
	ts := startServer(b, baseConfig())
	body := podReview(b, fixturePod(b))
	b.ReportAllocs()
	for b.Loop() {
		if out := ts.review(b, inject.PathNamespace, body); !out.Response.Allowed {
			b.Fatal("refused")
		}
	}
}
