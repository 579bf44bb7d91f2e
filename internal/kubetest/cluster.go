package kubetest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"

	"latch.dev/latch/internal/freeport"
)

// Cluster is an etcd and a kube-apiserver on loopback. There is no scheduler
// and no controller manager: objects are stored, validated, admitted (webhooks
// included) and watched, and nothing else happens to them.
type Cluster struct {
	// Config authenticates as an administrator (group system:masters).
	Config *rest.Config
	// Version is the Kubernetes version the API server reports.
	Version string

	tools   Tools
	dir     string
	pki     *pki
	apiPort int
	etcdURL string

	mu        sync.Mutex
	etcd      *process
	apiserver *process
}

// process is a child with its output kept in a file for when a test fails.
type process struct {
	name string
	cmd  *exec.Cmd
	log  string
	done chan struct{}
	err  error // once done
}

func start(name, logFile string, bin string, args ...string) (*process, error) {
	out, err := os.OpenFile(logFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = out, out
	cmd.Env = withoutProxy(os.Environ())
	cmd.SysProcAttr = sysProcAttr()
	if err := cmd.Start(); err != nil {
		out.Close()
		return nil, fmt.Errorf("starting %s: %w", name, err)
	}
	p := &process{name: name, cmd: cmd, log: logFile, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		out.Close()
		close(p.done)
	}()
	return p, nil
}

// withoutProxy drops the HTTP proxy settings: the API server would send its
// calls to webhooks (service names that only a cluster resolves) through a
// proxy of the test machine's.
func withoutProxy(env []string) []string {
	var out []string
	for _, kv := range env {
		k, _, _ := strings.Cut(kv, "=")
		switch strings.ToUpper(k) {
		case "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY":
			continue
		}
		out = append(out, kv)
	}
	return out
}

// kill ends the process at once: a test cluster's data is thrown away, and
// a graceful kube-apiserver shutdown waits seconds for its watches.
func (p *process) kill() {
	if p == nil {
		return
	}
	_ = p.cmd.Process.Kill()
	<-p.done
}

// tail is the end of the process's log, for error messages.
func (p *process) tail() string {
	b, _ := os.ReadFile(p.log)
	if len(b) > 4000 {
		b = b[len(b)-4000:]
	}
	return string(b)
}

// Start builds the binaries if need be and starts a cluster whose files live
// in a new temporary directory; Stop ends it and removes them.
func Start(ctx context.Context, progress io.Writer) (*Cluster, error) {
	tools, err := Binaries(ctx, progress)
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "latch-kubetest-")
	if err != nil {
		return nil, err
	}
	c := &Cluster{tools: tools, dir: dir, Version: tools.Version}
	if err := c.start(ctx); err != nil {
		c.Stop()
		return nil, err
	}
	return c, nil
}

func (c *Cluster) start(ctx context.Context) error {
	var err error
	if c.pki, err = newPKI(c.dir); err != nil {
		return fmt.Errorf("making the cluster's keys: %w", err)
	}
	ports := make([]int, 3)
	for i := range ports {
		if ports[i], err = freeport.Port(); err != nil {
			return err
		}
	}
	client, peer := "http://127.0.0.1:"+strconv.Itoa(ports[0]), "http://127.0.0.1:"+strconv.Itoa(ports[1])
	c.etcdURL, c.apiPort = client, ports[2]
	c.etcd, err = start("etcd", filepath.Join(c.dir, "etcd.log"), c.tools.Etcd,
		"--name=kubetest",
		"--data-dir="+filepath.Join(c.dir, "etcd"),
		"--listen-client-urls="+client, "--advertise-client-urls="+client,
		"--listen-peer-urls="+peer, "--initial-advertise-peer-urls="+peer,
		"--initial-cluster=kubetest="+peer,
		// A test cluster's data is thrown away: no fsync, which on a
		// shared CI disk costs more than everything else.
		"--unsafe-no-fsync",
		"--log-level=warn",
	)
	if err != nil {
		return err
	}
	if err := waitTCP(ctx, c.etcd, "127.0.0.1:"+strconv.Itoa(ports[0])); err != nil {
		return err
	}
	if err := c.StartAPIServer(ctx); err != nil {
		return err
	}
	c.Config = &rest.Config{
		Host: "https://127.0.0.1:" + strconv.Itoa(c.apiPort),
		TLSClientConfig: rest.TLSClientConfig{
			CAData:   c.pki.caPEM,
			CertData: c.pki.clientCert,
			KeyData:  c.pki.clientKey,
		},
		QPS:   1000,
		Burst: 1000,
	}
	return c.waitReady(ctx)
}

// StartAPIServer starts the API server (again, after StopAPIServer) on the
// same port, etcd and keys, and waits until it answers /readyz.
func (c *Cluster) StartAPIServer(ctx context.Context) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.apiserver != nil {
		select {
		case <-c.apiserver.done:
		default:
			return errors.New("kube-apiserver is already running")
		}
	}
	p, err := start("kube-apiserver", filepath.Join(c.dir, "kube-apiserver.log"), c.tools.APIServer,
		"--etcd-servers="+c.etcdURL,
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		// No "kubernetes" Service endpoints to keep: they may not be loopback.
		"--endpoint-reconciler-type=none",
		"--secure-port="+strconv.Itoa(c.apiPort),
		"--cert-dir="+filepath.Join(c.dir, "apiserver-certs"),
		"--tls-cert-file="+c.pki.servingCert,
		"--tls-private-key-file="+c.pki.servingKey,
		"--client-ca-file="+c.pki.caFile,
		"--service-account-issuer=https://kubernetes.default.svc",
		"--service-account-key-file="+c.pki.saPubFile,
		"--service-account-signing-key-file="+c.pki.saKeyFile,
		"--service-cluster-ip-range=10.96.0.0/24",
		// RBAC as in a real cluster: the chart's roles are tested by
		// impersonating its service accounts.
		"--authorization-mode=RBAC",
		// No controller manager creates the default service account that
		// this admission plugin would insist on for every pod.
		"--disable-admission-plugins=ServiceAccount",
		"--allow-privileged=true",
		"--enable-priority-and-fairness=false",
		"--profiling=false",
		"--v=1",
	)
	if err != nil {
		return err
	}
	c.apiserver = p
	if c.Config != nil {
		return c.waitReady(ctx)
	}
	return nil
}

// StopAPIServer kills the API server, as a crash would, leaving etcd and
// its data.
func (c *Cluster) StopAPIServer() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.apiserver.kill()
}

// waitReady polls /readyz until the API server is ready, it exits, or a
// minute passes.
func (c *Cluster) waitReady(ctx context.Context) error {
	cs, err := kubernetes.NewForConfig(c.Config)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	var last error
	for {
		body, err := cs.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
		if err == nil && bytes.Equal(bytes.TrimSpace(body), []byte("ok")) {
			return nil
		}
		last = err
		select {
		case <-c.apiserver.done:
			return fmt.Errorf("kube-apiserver exited (%v); its log ends:\n%s", c.apiserver.err, c.apiserver.tail())
		case <-ctx.Done():
			return fmt.Errorf("kube-apiserver not ready (%v); its log ends:\n%s", last, c.apiserver.tail())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func waitTCP(ctx context.Context, p *process, addr string) error {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	for {
		conn, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			conn.Close()
			return nil
		}
		select {
		case <-p.done:
			return fmt.Errorf("%s exited (%v); its log ends:\n%s", p.name, p.err, p.tail())
		case <-ctx.Done():
			return fmt.Errorf("%s not listening on %s: %v", p.name, addr, err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// Stop ends the cluster and removes its files.
func (c *Cluster) Stop() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.apiserver.kill()
	c.etcd.kill()
	if c.dir != "" {
		os.RemoveAll(c.dir)
	}
}

// As returns a configuration that acts as user (with groups) by
// impersonation: what a test uses to check that a role grants enough.
func (c *Cluster) As(user string, groups ...string) *rest.Config {
	cfg := rest.CopyConfig(c.Config)
	cfg.Impersonate = rest.ImpersonationConfig{UserName: user, Groups: groups}
	return cfg
}

// AsServiceAccount is As for the service account namespace/name, with the
// groups the API server gives service-account tokens.
func (c *Cluster) AsServiceAccount(namespace, name string) *rest.Config {
	return c.As("system:serviceaccount:"+namespace+":"+name,
		"system:serviceaccounts", "system:serviceaccounts:"+namespace, "system:authenticated")
}

// WriteKubeconfig writes a kubeconfig file for the administrator into dir
// and returns its path, for code that takes --kubeconfig.
func (c *Cluster) WriteKubeconfig(dir string) (string, error) {
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["kubetest"] = &clientcmdapi.Cluster{Server: c.Config.Host, CertificateAuthorityData: c.Config.CAData}
	cfg.AuthInfos["admin"] = &clientcmdapi.AuthInfo{ClientCertificateData: c.Config.CertData, ClientKeyData: c.Config.KeyData}
	cfg.Contexts["kubetest"] = &clientcmdapi.Context{Cluster: "kubetest", AuthInfo: "admin"}
	cfg.CurrentContext = "kubetest"
	path := filepath.Join(dir, "kubeconfig")
	if err := clientcmd.WriteToFile(*cfg, path); err != nil {
		return "", fmt.Errorf("writing %s: %w", path, err)
	}
	return path, nil
}

// Logs returns the end of the API server's log, for a failing test to show.
func (c *Cluster) Logs() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return strings.TrimSpace(c.apiserver.tail())
}
