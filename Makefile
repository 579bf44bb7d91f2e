# Everyday targets. `make test` is the one command CI runs (.ci/run).
GO      ?= go
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
# Keep in step with the Dockerfile's build line (a test checks the Dockerfile's flags).
LDFLAGS := -s -w -X main.version=$(VERSION)
HELM_VERSION := v3.22.0

.PHONY: all build test test-short demo lint fmt vet staticcheck bench bench-smoke bench-compare bench-floor reliability soak fuzz tools kube-tools clean

all: build

build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "$(LDFLAGS)" -o bin/latch ./cmd/latch

# The full suite, race detector on: a proxy is all concurrency. The fuzz
# targets' seed corpora and every past finding (testdata/fuzz) run in it as
# plain tests; then every target fuzzes briefly (CI_FUZZTIME executions
# each). A failure there is a real finding: fix it and keep the input as a
# seed. Longer runs: `make fuzz`.
test: tools kube-tools
	$(GO) test -race -timeout 20m ./...
	@$(MAKE) --no-print-directory bench-smoke
	@$(MAKE) --no-print-directory fuzz FUZZTIME=$(CI_FUZZTIME)

test-short:
	$(GO) test -short ./...

demo:
	$(GO) run ./cmd/latch demo

lint: vet staticcheck
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || (gofmt -l $$(git ls-files '*.go'); exit 1)

fmt:
	gofmt -w $$(git ls-files '*.go')

vet:
	$(GO) vet ./...

staticcheck:
	@command -v staticcheck >/dev/null 2>&1 || $(GO) install honnef.co/go/tools/cmd/staticcheck@latest
	PATH="$$PATH:$$($(GO) env GOPATH)/bin" staticcheck ./...

bench:
	$(GO) test -run '^$$' -bench . -benchmem ./proxy/... ./identity/...

# Every benchmark once: not a measurement (the figures of one iteration mean
# nothing) but the run that keeps benchmark code from rotting. Each package's
# TestMain runs goleak, so a benchmark that panics or leaves a goroutine
# behind fails here; proxy's benchmarks park their connections at once in
# this mode. -short skips the sizes that only make sense for measuring.
bench-smoke:
	$(GO) test -short -run '^$$' -bench . -benchtime 1x ./...

# The side-by-side benchmark against HAProxy, nginx and stunnel (docs/performance.md).
# BENCHFLAGS: e.g. "-ghostunnel /path/to/ghostunnel -rounds 5" (docs/performance.md).
bench-compare:
	$(GO) run ./cmd/latch-bench $(BENCHFLAGS)

# The control plane at mesh scale (xds/README.md, "Measured"): 1,000 and
# 10,000 simulated sidecars in their own process, SotW and delta; a change to
# every workload, a change to one, a control-plane restart and a replica
# failover, each figure printed with the load average. SIDECARS=10000 alone
# took 3.3 minutes on 2 shared cores. SIDECARS=2000 for another size;
# PROFILE=dir for the control plane's CPU and heap profiles;
# CP_GOMEMLIMIT=700MiB for the control plane's GOMEMLIMIT (the chart sets it
# from the memory limit).
SIDECARS ?= 1000,10000
bench-propagation:
	LATCH_XDS_BENCH_SIDECARS=$(SIDECARS) LATCH_XDS_BENCH_PROFILE=$(PROFILE) LATCH_XDS_BENCH_CP_GOMEMLIMIT=$(CP_GOMEMLIMIT) \
		$(GO) test ./xds/server -run '^$$' -bench Propagation -benchtime 1x -timeout 120m

# What one connected sidecar costs the control plane in memory, layer by
# layer (xds/README.md, "Memory"): bare gRPC with the control plane's TLS and
# server options, then go-control-plane, then latch, STREAMS streams each,
# SotW and delta. 10,000 took about 2 minutes on 2 shared cores. CP_ENV adds
# to the server process's environment, e.g. CP_ENV='GOGC=50' or
# CP_ENV='GOMEMLIMIT=400MiB'; LAYERS=grpc,go-control-plane for some only.
STREAMS ?= 10000
bench-floor:
	LATCH_XDS_FLOOR_STREAMS=$(STREAMS) LATCH_XDS_FLOOR_CP_ENV='$(CP_ENV)' LATCH_XDS_FLOOR_LAYERS=$(LAYERS) \
		$(GO) test ./xds/server -run '^$$' -bench Floor -benchtime 1x -timeout 60m

# Load, faults and hostile input, with the figures table (docs/security.md).
reliability:
	$(GO) test ./reliability -run . -v -count=1 -args -summary

soak:
	LATCH_SOAK=10m $(GO) test ./reliability -run Soak -v -timeout 30m -args -summary

# Every fuzz target for FUZZTIME each (go test -fuzz takes one target at a
# time), then one summary line per target with what it did. CI runs a fixed
# number of executions per target (CI_FUZZTIME): a time budget let slow
# start-ups and slow targets run a few dozen inputs and others thousands.
# FUZZMINIMIZETIME bounds the shrinking of each new-coverage input: with
# Go's default (60 s) the first one a target finds can take its whole
# budget; a failing input is still saved, only less shrunk.
FUZZTIME ?= 30s
CI_FUZZTIME ?= 5000x
FUZZMINIMIZETIME ?= 100x
FUZZ_TARGETS := ./proxy:FuzzParseConfig ./identity:FuzzParseRule ./identity:FuzzNarrow \
	./identity:FuzzSANSpelling ./xds/policy:FuzzParse ./xds/policy:FuzzParseObject \
	./xds/policy:FuzzDeclarationToProxy ./xds/client:FuzzValidate ./xds/client:FuzzUpdate \
	./inject:FuzzParseSpec
fuzz:
	@set -e; sum=$$(mktemp); log=$$(mktemp); trap 'rm -f $$sum $$log' EXIT; \
	for t in $(FUZZ_TARGETS); do \
		echo "== $$t"; start=$$(date +%s); rc=0; \
		$(GO) test $${t%%:*} -run '^$$' -fuzz "^$${t##*:}$$" -fuzztime $(FUZZTIME) -fuzzminimizetime $(FUZZMINIMIZETIME) >$$log 2>&1 || rc=$$?; \
		cat $$log; \
		printf '%-36s %4ss  %s\n' "$$t" "$$(( $$(date +%s) - start ))" \
			"$$(grep -E '^fuzz: elapsed: .*execs: ' $$log | tail -1 | sed -E 's/^fuzz: elapsed: [^,]*, //; s/ \([0-9]+\/sec\)//')" >>$$sum; \
		if [ $$rc -ne 0 ]; then echo "== $$t FAILED"; cat $$sum; exit $$rc; fi; \
	done; \
	echo "== fuzz summary: -fuzztime $(FUZZTIME) per target (wall time includes the build)"; cat $$sum

# Tools the tests need that a fresh machine lacks: helm for the chart tests.
tools:
	@PATH="$$PATH:$$($(GO) env GOPATH)/bin" command -v helm >/dev/null 2>&1 || \
		(echo "installing helm $(HELM_VERSION)"; $(GO) install helm.sh/helm/v3/cmd/helm@$(HELM_VERSION))

# The kube-apiserver and etcd the Kubernetes tests run against, built from the
# pinned module in internal/kubetest/tools into the user's cache (once per
# version: 10-30 min on two cold cores, then nothing). A step of its own so
# that a first run's time is visible here rather than inside a test.
kube-tools:
	@echo "kube-tools: kube-apiserver and etcd for the Kubernetes tests (cached per version; a first build takes 10-30 min)"
	$(GO) run ./internal/kubetest/cmd/kube-tools

clean:
	rm -rf bin
