package main

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
	"time"
)

// TestLoggerWritesDurationsAsStrings: every daemon's logger writes a
// duration as "30s" in both formats, whether it is an attribute of the
// record, bound with With, or inside a group.
func TestLoggerWritesDurationsAsStrings(t *testing.T) {
	for _, format := range []string{"json", "text"} {
		t.Run(format, func(t *testing.T) {
			var b bytes.Buffer
			log, err := newLogger(&b, format, "info")
			if err != nil {
				t.Fatal(err)
			}
			log.With("bound", 1500*time.Millisecond).WithGroup("g").Info("stopping",
				"drain_timeout", 30*time.Second, "elapsed", 3997*time.Millisecond, "count", 3)
			out := b.String()
			if format == "json" {
				var m map[string]any
				if err := json.Unmarshal(b.Bytes(), &m); err != nil {
					t.Fatalf("%v: %s", err, out)
				}
				g, _ := m["g"].(map[string]any)
				if m["bound"] != "1.5s" || g["drain_timeout"] != "30s" || g["elapsed"] != "3.997s" || g["count"] != float64(3) {
					t.Errorf("durations not written as strings: %s", out)
				}
				return
			}
			for _, want := range []string{"bound=1.5s", "g.drain_timeout=30s", "g.elapsed=3.997s", "g.count=3"} {
				if !strings.Contains(out, want) {
					t.Errorf("%q not in %s", want, out)
				}
			}
		})
	}
}
