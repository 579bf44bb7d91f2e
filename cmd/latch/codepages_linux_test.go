package main

import (
	"bufio"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"os"
	"strconv"
	"strings"
	"testing"
)

// written is in the executable's writable data (it has a non-zero initial
// value); MADV_DONTNEED there would put back the file's value and lose the
// write below.
var written = []byte("initial")

// TestUnmapStartupCode: the executable's read-only mappings leave the
// resident set, the code runs on (it is mapped back on use), and writable
// data keeps what was written to it.
func TestUnmapStartupCode(t *testing.T) {
	written[0] = 'W'
	before := rssFileKB(t)
	n, err := unmapStartupCode()
	if err != nil {
		t.Fatal(err)
	}
	after := rssFileKB(t)
	t.Logf("unmapped %d MB of mappings; file-backed RSS %d KB -> %d KB", n>>20, before, after)
	if n < 1<<20 {
		t.Fatalf("unmapped %d bytes: the executable's mappings were not found", n)
	}
	// The test binary maps well over 8 MB of itself by now (the race
	// runtime, testing, crypto); what stays is what runs between the two
	// readings.
	if after > before/2 || before-after < 4<<10 {
		t.Fatalf("file-backed RSS went from %d KB to %d KB: the code was not unmapped", before, after)
	}
	if string(written) != "Wnitial" {
		t.Fatalf("writable data lost its write: %q", written)
	}
	// Code and tables come back on use: run something this test had not
	// run before.
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256([]byte("latch"))
	sig, err := ecdsa.SignASN1(rand.Reader, key, sum[:])
	if err != nil || !ecdsa.VerifyASN1(&key.PublicKey, sum[:], sig) {
		t.Fatalf("signing after the unmap: %v", err)
	}
}

func rssFileKB(t *testing.T) int {
	t.Helper()
	f, err := os.Open("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "RssFile:"); ok {
			kb, err := strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")))
			if err != nil {
				t.Fatalf("RssFile %q: %v", v, err)
			}
			return kb
		}
	}
	t.Fatal("no RssFile in /proc/self/status")
	return 0
}
