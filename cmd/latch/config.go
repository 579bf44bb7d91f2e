package main

import (
	"fmt"
	"os"

	"go.yaml.in/yaml/v3"

	"latch.dev/latch/proxy"
)

// loadProxyConfig reads the static sidecar configuration. A file that is a
// ServicePolicy declaration instead (the other YAML latch reads, easy to
// mistake for this one) is refused with what it is and where it belongs,
// rather than with its first unknown key.
func loadProxyConfig(path string) (*proxy.Config, error) {
	cfg, err := proxy.LoadFile(path)
	if err != nil {
		return nil, explainConfigError(path, err)
	}
	return cfg, nil
}

// applyProxyConfigFile re-reads the file into srv (SIGHUP), with the same
// explanation for a declaration.
func applyProxyConfigFile(srv *proxy.Server, path string) (*proxy.Config, error) {
	cfg, err := srv.ApplyFile(path)
	if err != nil {
		return nil, explainConfigError(path, err)
	}
	return cfg, nil
}

func explainConfigError(path string, err error) error {
	data, rerr := os.ReadFile(path)
	if rerr != nil {
		return err
	}
	var head struct {
		APIVersion string `yaml:"apiVersion"`
		Kind       string `yaml:"kind"`
	}
	// Only the first document matters: a declarations file may hold several.
	if yaml.Unmarshal(data, &head) != nil || head.Kind != "ServicePolicy" {
		return err
	}
	return fmt.Errorf("%s is a ServicePolicy declaration (%s), not a sidecar configuration: "+
		"declarations are read by `latch control-plane --declarations DIR`, which serves each sidecar its policy over xDS "+
		"(run the sidecar with --xds-address); `latch proxy --config` takes the static file of docs/configuration.md", path, head.APIVersion)
}
