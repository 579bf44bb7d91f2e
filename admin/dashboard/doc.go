// Package dashboard keeps the Grafana dashboard shipped in
// charts/latch/dashboards honest: its test fails when a panel queries a
// metric or a label that no latch code registers. It has no code of its own;
// it is a package so that the test can import every part that registers
// metrics (admin, proxy, the xDS client and server) without making admin
// depend on them.
package dashboard
