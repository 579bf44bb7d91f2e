//go:build !linux

package proxy

import "log/slog"

// parker is only implemented on Linux (see parker_linux.go): elsewhere there
// is no socket to wait on (newSocket returns nil) and a direction waits for
// data on its goroutine.
type parker struct{ log *slog.Logger }

func (p *parker) park(*side) bool { return false }
func (p *parker) wake(*conn)      {}
func (p *parker) count() int      { return 0 }
func (p *parker) close()          {}

// graceSweeper ends long waits on a socket (see grace_linux.go); there are
// none elsewhere.
type graceSweeper struct{}

func (*graceSweeper) track(*conn)   {}
func (*graceSweeper) untrack(*conn) {}
func (*graceSweeper) close()        {}
