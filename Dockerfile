# syntax=docker/dockerfile:1
#
# latch: one static binary on a distroless base. Build with
#   docker build --build-arg VERSION=$(git describe --tags --always) -t latch .
# charts/latch_test checks this file's properties and builds the binary with
# exactly the flags of the RUN line below.

FROM --platform=$BUILDPLATFORM golang:1.26 AS build
ARG TARGETOS=linux
ARG TARGETARCH=amd64
ARG VERSION=dev
WORKDIR /src
# Dependencies first, so a source change does not re-download modules.
COPY go.mod go.sum ./
RUN go mod download
COPY . .
# Static (no cgo, no libc), reproducible paths (-trimpath), no symbol table.
RUN CGO_ENABLED=0 GOOS=${TARGETOS} GOARCH=${TARGETARCH} go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" -o /out/latch ./cmd/latch

# distroless/static: no shell, no package manager, no libc. Its CA bundle is
# never used: latch trusts only the SPIFFE bundle from the Workload API.
FROM gcr.io/distroless/static-debian12:nonroot
ARG VERSION=dev
LABEL org.opencontainers.image.title="latch" \
      org.opencontainers.image.description="L4 mTLS sidecar proxy with SPIFFE identities" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/latch /latch
USER 65532:65532
ENTRYPOINT ["/latch"]
