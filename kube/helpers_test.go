package kube_test

import (
	"encoding/json"
	"strconv"
)

func itoa(i int) string { return strconv.Itoa(i) }

func jsonOf(v any) ([]byte, error) { return json.Marshal(v) }
