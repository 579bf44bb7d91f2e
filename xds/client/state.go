package client

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
)

// stateFile is the file in StateDir holding the last applied resources.
const stateFile = "xds-state.json"

// savedState is the state file: the raw resources as the control plane sent
// them (validated again on load, by whatever rules that binary has) and the
// versions they came with.
type savedState struct {
	Node      string                       `json:"node"`
	Versions  map[string]string            `json:"versions"`
	Resources map[string]map[string][]byte `json:"resources"` // type URL → name → serialized Any
	// Version and ResourceVersions are delta xDS's: the latest response's
	// system version, and each resource's version, which a delta stream
	// after a restart says it holds, so nothing unchanged is sent again.
	Version          string                       `json:"version,omitempty"`
	ResourceVersions map[string]map[string]string `json:"resource_versions,omitempty"`
}

// save writes r atomically: a crash leaves the old file or the new one,
// never a mix.
func (c *Client) save(r resources) error {
	if c.opts.StateDir == "" {
		return nil
	}
	st := savedState{Node: c.opts.NodeID.String(), Versions: r.versions, Resources: map[string]map[string][]byte{},
		Version: r.latest, ResourceVersions: r.resVersions}
	for typ, m := range r.raw {
		st.Resources[typ] = map[string][]byte{}
		for name, a := range m {
			b, err := proto.Marshal(a)
			if err != nil {
				return fmt.Errorf("encoding %s %q: %w", shortType(typ), name, err)
			}
			st.Resources[typ][name] = b
		}
	}
	data, err := json.Marshal(st)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(c.opts.StateDir, 0o700); err != nil {
		return err
	}
	tmp, err := os.CreateTemp(c.opts.StateDir, "."+stateFile+".*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name()) // after a successful rename this is a no-op
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), filepath.Join(c.opts.StateDir, stateFile)); err != nil {
		return err
	}
	// The rename is durable only once the directory is.
	if d, err := os.Open(c.opts.StateDir); err == nil {
		_ = d.Sync()
		d.Close()
	}
	return nil
}

// restore applies the saved state, if any, exactly as if the control plane
// had just sent it: validated, built, applied. A state file that fails is
// logged and ignored; the sidecar then waits for the control plane.
func (c *Client) restore() {
	if c.opts.StateDir == "" {
		return
	}
	err := c.restoreFrom(filepath.Join(c.opts.StateDir, stateFile))
	if errors.Is(err, fs.ErrNotExist) {
		c.log.Info("no saved xds state: serving nothing until the control plane answers", "dir", c.opts.StateDir)
		return
	}
	if err != nil {
		c.log.Error("saved xds state not used", "dir", c.opts.StateDir, "reason", err)
	}
}

func (c *Client) restoreFrom(path string) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	var st savedState
	if err := json.Unmarshal(data, &st); err != nil {
		return fmt.Errorf("decoding %s: %w", path, err)
	}
	if st.Node != c.opts.NodeID.String() {
		return fmt.Errorf("%s holds the state of %s, not %s", path, st.Node, c.opts.NodeID)
	}
	r := newResources()
	for _, typ := range []string{ClusterType, EndpointType, ListenerType} {
		var list []*anypb.Any
		for name, b := range st.Resources[typ] {
			a := &anypb.Any{}
			if err := proto.Unmarshal(b, a); err != nil {
				return fmt.Errorf("decoding %s %q: %w", shortType(typ), name, err)
			}
			list = append(list, a)
		}
		if err := c.decode(&r, typ, list); err != nil {
			return err
		}
		if v, ok := st.Versions[typ]; ok {
			r.versions[typ] = v
		}
		for name, v := range st.ResourceVersions[typ] {
			if _, ok := r.raw[typ][name]; ok {
				r.resVersions[typ][name] = v
			}
		}
	}
	r.latest = st.Version
	if !r.complete() {
		return fmt.Errorf("%s: listeners or clusters missing", path)
	}
	cfg, err := c.v.Build(r.set, r.version())
	if err != nil {
		return err
	}
	cfg.Source = "xds-state"
	if err := c.apply(cfg); err != nil {
		return fmt.Errorf("applying saved version %s: %w", cfg.Version, err)
	}
	c.pending = r
	c.appliedAt = configKey(cfg)
	c.setStatus(func(s *Status) { s.AppliedVersion = cfg.Version })
	c.log.Info("serving saved xds state until the control plane answers", "version", cfg.Version)
	return nil
}
