//go:build !linux

package main

// unmapStartupCode does nothing outside Linux; see codepages_linux.go.
func unmapStartupCode() (int, error) { return 0, nil }
