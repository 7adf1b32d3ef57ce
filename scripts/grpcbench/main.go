// grpcbench: the gRPC server and load generator of scripts/bench-grpc. No generated code: every
// method carries raw bytes (a codec that passes them through), which is all a proxy sees.
//
//	grpcbench serve -addr 127.0.0.1:PORT
//	    answers every unary method with 16 bytes, over h2c
//	grpcbench load -addr HOST:PORT -conns 4 -conc 32 -seconds 5
//	    as many unary calls as conc callers spread over conns channels complete; one JSON line:
//	    rps, errors, p50_ms, p99_ms
//	grpcbench rate -addr HOST:PORT -rps 1000 -conns 4 -seconds 5
//	    calls at a fixed rate, latency counted from each call's scheduled time; one JSON line
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"os"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/encoding"
)

type raw struct{}

func (raw) Name() string { return "proto" }

func (raw) Marshal(v any) ([]byte, error) { return *(v.(*[]byte)), nil }

func (raw) Unmarshal(data []byte, v any) error {
	*(v.(*[]byte)) = append([]byte(nil), data...)
	return nil
}

var _ encoding.Codec = raw{}

const method = "/hcc.Test/Echo"

func serve(addr string) error {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	answer := []byte("0123456789abcdef")
	s := grpc.NewServer(grpc.ForceServerCodec(raw{}), grpc.UnknownServiceHandler(
		func(_ any, stream grpc.ServerStream) error {
			var in []byte
			if err := stream.RecvMsg(&in); err != nil {
				return err
			}
			return stream.SendMsg(&answer)
		}))
	fmt.Println("ready")
	return s.Serve(l)
}

func dial(addr string, n int) ([]*grpc.ClientConn, error) {
	var conns []*grpc.ClientConn
	for i := 0; i < n; i++ {
		c, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()),
			grpc.WithDefaultCallOptions(grpc.ForceCodec(raw{})))
		if err != nil {
			return nil, err
		}
		conns = append(conns, c)
	}
	return conns, nil
}

func call(c *grpc.ClientConn) error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	req, resp := []byte("x"), []byte(nil)
	return c.Invoke(ctx, method, &req, &resp)
}

func percentile(d []time.Duration, p float64) float64 {
	if len(d) == 0 {
		return 0
	}
	sort.Slice(d, func(i, j int) bool { return d[i] < d[j] })
	i := int(float64(len(d)-1) * p)
	return float64(d[i].Microseconds()) / 1000
}

type result struct {
	RPS    float64 `json:"rps"`
	Calls  int64   `json:"calls"`
	Errors int64   `json:"errors"`
	P50    float64 `json:"p50_ms"`
	P99    float64 `json:"p99_ms"`
	Max    float64 `json:"max_ms"`
}

func load(addr string, nconns, conc int, seconds float64) (result, error) {
	conns, err := dial(addr, nconns)
	if err != nil {
		return result{}, err
	}
	var ok, bad int64
	var mu sync.Mutex
	var lat []time.Duration
	deadline := time.Now().Add(time.Duration(seconds * float64(time.Second)))
	var wg sync.WaitGroup
	start := time.Now()
	for i := 0; i < conc; i++ {
		wg.Add(1)
		go func(c *grpc.ClientConn) {
			defer wg.Done()
			var mine []time.Duration
			for time.Now().Before(deadline) {
				t := time.Now()
				if call(c) != nil {
					atomic.AddInt64(&bad, 1)
					continue
				}
				atomic.AddInt64(&ok, 1)
				mine = append(mine, time.Since(t))
			}
			mu.Lock()
			lat = append(lat, mine...)
			mu.Unlock()
		}(conns[i%len(conns)])
	}
	wg.Wait()
	took := time.Since(start).Seconds()
	return result{RPS: float64(ok) / took, Calls: ok, Errors: bad, P50: percentile(lat, 0.5),
		P99: percentile(lat, 0.99), Max: percentile(lat, 1)}, nil
}

func rate(addr string, nconns int, rps float64, seconds float64) (result, error) {
	conns, err := dial(addr, nconns)
	if err != nil {
		return result{}, err
	}
	n := int(rps * seconds)
	interval := time.Duration(float64(time.Second) / rps)
	var bad int64
	lat := make([]time.Duration, n)
	var wg sync.WaitGroup
	start := time.Now()
	for i := 0; i < n; i++ {
		at := start.Add(time.Duration(i) * interval)
		time.Sleep(time.Until(at))
		wg.Add(1)
		go func(i int, at time.Time) {
			defer wg.Done()
			if call(conns[i%len(conns)]) != nil {
				atomic.AddInt64(&bad, 1)
			}
			lat[i] = time.Since(at)
		}(i, at)
	}
	wg.Wait()
	return result{RPS: rps, Calls: int64(n), Errors: bad, P50: percentile(lat, 0.5),
		P99: percentile(lat, 0.99), Max: percentile(lat, 1)}, nil
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: grpcbench serve|load|rate [flags]")
		os.Exit(64)
	}
	fs := flag.NewFlagSet(os.Args[1], flag.ExitOnError)
	addr := fs.String("addr", "127.0.0.1:0", "address")
	conns := fs.Int("conns", 4, "channels")
	conc := fs.Int("conc", 32, "concurrent callers")
	seconds := fs.Float64("seconds", 5, "duration")
	rps := fs.Float64("rps", 1000, "calls per second")
	_ = fs.Parse(os.Args[2:])
	var r result
	var err error
	switch os.Args[1] {
	case "serve":
		err = serve(*addr)
	case "load":
		r, err = load(*addr, *conns, *conc, *seconds)
	case "rate":
		r, err = rate(*addr, *conns, *rps, *seconds)
	default:
		err = fmt.Errorf("unknown command %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "grpcbench:", err)
		os.Exit(1)
	}
	if os.Args[1] != "serve" {
		_ = json.NewEncoder(os.Stdout).Encode(r)
	}
}
