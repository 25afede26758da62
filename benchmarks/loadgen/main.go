// loadgen drives /tutorial.NumberService/AccumulateNumbers as fast as it can and
// verifies every sum; benchmarks/bench.py builds and runs it (one run per mode):
// pingpong (one lock-step stream), stream (one pipelined stream), concurrent
// (-streams lock-step streams over -conns connections), short (-streams at a time
// over -conns, each opened, -per-stream lock-step numbers, closed; streams/s) and
// pipelined-many (-streams pipelined streams over -conns connections).
//
// It is compiled so that the load client is not the bottleneck: it uses grpc-go
// from Debian (golang-google-grpc-dev), no generated code, and a codec that passes
// raw bytes through; it encodes each int32 request and decodes each sum itself.
//
//	loadgen -addr 127.0.0.1:50051 -mode stream -seconds 5 -warmup 1 -server-pid 1234
//
// It prints one JSON object: messages answered (and verified) in the measured
// window, its length, latency percentiles (ping-pong), and the CPU seconds this
// process and the server (read from /proc/PID/stat) spent in the window. With
// -goaways, also the last-stream-id of every GOAWAY the server sent, read from the
// bytes of each connection (grpc-go says nothing of them): what a drain sends.
//
// -addr may name several servers (comma-separated): each connection then balances
// its streams round robin over all of them (grpc-go's round_robin policy, a manual
// resolver), as a client of replicas does. SIGINT or SIGTERM ends the measured
// window early: the run then stops and reports as at the end of -seconds.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/ioutil"
	"net"
	"os"
	"os/signal"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/resolver"
	"google.golang.org/grpc/resolver/manual"
)

const method = "/tutorial.NumberService/AccumulateNumbers"

// rawCodec hands []byte through: requests are encoded here, not by protobuf.
type rawCodec struct{}

func (rawCodec) Marshal(v interface{}) ([]byte, error) { return *(v.(*[]byte)), nil }
func (rawCodec) Unmarshal(data []byte, v interface{}) error {
	*(v.(*[]byte)) = append((*(v.(*[]byte)))[:0], data...)
	return nil
}
func (rawCodec) Name() string { return "proto" }

var _ encoding.Codec = rawCodec{}

// number is the i-th request of every stream: a walk over [-1000, 1000] whose
// sums stay far inside int32, with zero (an empty message) and negatives
// (10-byte varints) in the mix.
func number(i int64) int32 { return int32((i*7919)%2001) - 1000 }

// encode returns field 1 as an int32 varint (empty for 0, as proto3 does) in a
// new slice: grpc-go may still be writing a sent message after SendMsg returns.
func encode(v int32) []byte {
	buf := make([]byte, 0, 11)
	if v == 0 {
		return buf
	}
	buf = append(buf, 0x08)
	u := uint64(int64(v)) // negative int32 goes out sign-extended
	for u >= 0x80 {
		buf = append(buf, byte(u)|0x80)
		u >>= 7
	}
	return append(buf, byte(u))
}

// decode reads a NumberResponse that holds only field 1 (the server's own encoding).
func decode(data []byte) (int32, error) {
	if len(data) == 0 {
		return 0, nil
	}
	if data[0] != 0x08 {
		return 0, fmt.Errorf("unexpected tag %#x in response %x", data[0], data)
	}
	var u uint64
	var shift uint
	for i := 1; i < len(data); i++ {
		u |= uint64(data[i]&0x7f) << shift
		if data[i] < 0x80 {
			if i != len(data)-1 {
				return 0, fmt.Errorf("trailing bytes in response %x", data)
			}
			return int32(u), nil
		}
		shift += 7
	}
	return 0, fmt.Errorf("truncated response %x", data)
}

type result struct {
	Mode             string   `json:"mode"`
	Client           string   `json:"client"`
	Streams          int      `json:"streams"`
	Connections      int      `json:"connections"`
	Messages         int64    `json:"messages"`
	StreamsDone      int64    `json:"streams_done"`
	StreamsPerSec    float64  `json:"streams_per_s"`
	Verified         int64    `json:"verified"`
	Seconds          float64  `json:"seconds"`
	MsgPerSec        float64  `json:"msg_per_s"`
	P50us            float64  `json:"p50_us,omitempty"`
	P90us            float64  `json:"p90_us,omitempty"`
	P99us            float64  `json:"p99_us,omitempty"`
	ClientCPUSeconds float64  `json:"client_cpu_s"`
	ServerCPUSeconds float64  `json:"server_cpu_s"`
	GoAways          []uint32 `json:"goaways,omitempty"`
	Error            string   `json:"error,omitempty"`
}

type run struct {
	answered  int64 // sums received and verified so far, all streams
	finished  int64 // short mode: streams that ended OK after all their sums
	measuring int32 // 1 while latencies are recorded
	mu        sync.Mutex
	latencies []time.Duration
	stopOnce  sync.Once
	err       error // the first failure; guarded by mu
	stop      chan struct{}
}

func (r *run) halt() { r.stopOnce.Do(func() { close(r.stop) }) }

func (r *run) fail(err error) {
	r.mu.Lock()
	if r.err == nil {
		r.err = err
	}
	r.mu.Unlock()
	r.halt()
}

func (r *run) stopped() bool {
	select {
	case <-r.stop:
		return true
	default:
		return false
	}
}

// openStream opens one AccumulateNumbers stream whose messages are raw bytes.
func openStream(ctx context.Context, cc *grpc.ClientConn) (grpc.ClientStream, error) {
	return cc.NewStream(ctx, &grpc.StreamDesc{ClientStreams: true, ServerStreams: true},
		method, grpc.ForceCodec(rawCodec{}))
}

// verify checks the answer to number i against the running sum, and counts it.
func (r *run) verify(in []byte, sum int32, i int64) error {
	got, err := decode(in)
	if err != nil {
		return err
	}
	if got != sum {
		return fmt.Errorf("wrong sum after %d numbers: got %d, want %d", i+1, got, sum)
	}
	atomic.AddInt64(&r.answered, 1)
	return nil
}

// pingPong sends one number and waits for its sum before the next.
func (r *run) pingPong(ctx context.Context, cc *grpc.ClientConn) error {
	st, err := openStream(ctx, cc)
	if err != nil {
		return err
	}
	var sum int32
	in := make([]byte, 0, 16)
	var local []time.Duration
	for i := int64(0); !r.stopped(); i++ {
		n := number(i)
		sum += n
		out := encode(n)
		t0 := time.Now()
		if err := st.SendMsg(&out); err != nil {
			return err
		}
		if err := st.RecvMsg(&in); err != nil {
			return err
		}
		d := time.Since(t0)
		if err := r.verify(in, sum, i); err != nil {
			return err
		}
		if atomic.LoadInt32(&r.measuring) == 1 {
			local = append(local, d)
		}
	}
	r.mu.Lock()
	r.latencies = append(r.latencies, local...)
	r.mu.Unlock()
	return finish(st)
}

// pipelined sends numbers without waiting for sums; at most inflight unanswered
// (0: as many as HTTP/2 flow control lets through).
func (r *run) pipelined(ctx context.Context, cc *grpc.ClientConn, inflight int) error {
	st, err := openStream(ctx, cc)
	if err != nil {
		return err
	}
	var window chan struct{}
	if inflight > 0 {
		window = make(chan struct{}, inflight)
	}
	sendErr := make(chan error, 1)
	go func() {
		for i := int64(0); !r.stopped(); i++ {
			if window != nil {
				select {
				case window <- struct{}{}:
				case <-r.stop:
				}
			}
			out := encode(number(i))
			if err := st.SendMsg(&out); err != nil {
				sendErr <- err
				return
			}
		}
		sendErr <- st.CloseSend()
	}()
	var sum int32
	in := make([]byte, 0, 16)
	for i := int64(0); ; i++ {
		err := st.RecvMsg(&in)
		if err == io.EOF {
			break
		}
		if err != nil {
			return err
		}
		sum += number(i)
		if err := r.verify(in, sum, i); err != nil {
			return err
		}
		if window != nil {
			select { // the last send after a stop took no slot
			case <-window:
			default:
			}
		}
	}
	return <-sendErr
}

// finish half-closes a lock-step stream and expects OK with no further sum.
func finish(st grpc.ClientStream) error {
	if err := st.CloseSend(); err != nil {
		return err
	}
	var in []byte
	if err := st.RecvMsg(&in); err != io.EOF {
		if err == nil {
			return errors.New("server sent a sum for no request")
		}
		return err
	}
	return nil
}

// goAways records the last-stream-id of every GOAWAY frame read on any connection.
type goAways struct {
	mu   sync.Mutex
	seen []uint32
}

// frameReader is a net.Conn whose reads are scanned for HTTP/2 frame headers (a
// server sends frames from its first byte on).
type frameReader struct {
	net.Conn
	log     *goAways
	header  []byte // the frame header read so far
	payload []byte // a GOAWAY's first 4 payload bytes read so far
	left    int    // payload bytes of the current frame still to come
	goaway  bool   // the current frame is a GOAWAY
}

func (c *frameReader) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	for _, b := range p[:n] {
		switch {
		case c.left == 0 && len(c.header) < 9:
			c.header = append(c.header, b)
			if len(c.header) == 9 {
				c.left = int(c.header[0])<<16 | int(c.header[1])<<8 | int(c.header[2])
				c.goaway = c.header[3] == 0x7
				c.header, c.payload = c.header[:0], c.payload[:0]
			}
		default:
			c.left--
			if c.goaway && len(c.payload) < 4 {
				c.payload = append(c.payload, b)
				if len(c.payload) == 4 {
					id := (uint32(c.payload[0])<<24 | uint32(c.payload[1])<<16 |
						uint32(c.payload[2])<<8 | uint32(c.payload[3])) & 0x7fffffff
					c.log.mu.Lock()
					c.log.seen = append(c.log.seen, id)
					c.log.mu.Unlock()
				}
			}
		}
	}
	return n, err
}

// short opens streams one after another, each with perStream lock-step numbers
// (every sum verified) then a half-close that must end with OK and no more sums.
func (r *run) short(ctx context.Context, cc *grpc.ClientConn, perStream int) error {
	in := make([]byte, 0, 16)
	for k := int64(0); !r.stopped(); k++ {
		st, err := openStream(ctx, cc)
		if err != nil {
			return err
		}
		var sum int32
		for i := int64(0); i < int64(perStream); i++ {
			n := number(k + i)
			sum += n
			out := encode(n)
			if err := st.SendMsg(&out); err != nil {
				return err
			}
			if err := st.RecvMsg(&in); err != nil {
				return err
			}
			if err := r.verify(in, sum, i); err != nil {
				return err
			}
		}
		if err := finish(st); err != nil {
			return err
		}
		atomic.AddInt64(&r.finished, 1)
	}
	return nil
}

func cpuSelf() float64 {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return float64(ru.Utime.Nano()+ru.Stime.Nano()) / 1e9
}

// cpuOf is the user+system CPU seconds of the processes in pids, a comma-separated
// list (a server and its workers); 0 for an empty list.
func cpuOf(pids string) float64 {
	total := 0.0
	for _, field := range strings.Split(pids, ",") {
		if pid, err := strconv.Atoi(field); err == nil && pid > 0 {
			total += cpuOfPid(pid)
		}
	}
	return total
}

// cpuOfPid is the user+system CPU seconds of one process (0 if it cannot be read).
func cpuOfPid(pid int) float64 {
	data, err := ioutil.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	s := string(data)
	fields := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	utime, _ := strconv.ParseFloat(fields[11], 64)
	stime, _ := strconv.ParseFloat(fields[12], 64)
	return (utime + stime) / 100 // USER_HZ is 100 on Linux
}

func percentile(sorted []time.Duration, p float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := int(p * float64(len(sorted)-1))
	return float64(sorted[i].Nanoseconds()) / 1e3
}

func main() {
	addr := flag.String("addr", "127.0.0.1:50051", "server host:port, or several comma-separated (round robin)")
	mode := flag.String("mode", "stream", "pingpong, stream, concurrent, short or pipelined-many")
	seconds := flag.Float64("seconds", 5, "measured seconds")
	warmup := flag.Float64("warmup", 1, "seconds of load before measuring")
	streams := flag.Int("streams", 100, "concurrent, short, pipelined-many: streams at a time")
	conns := flag.Int("conns", 4, "concurrent, short, pipelined-many: connections")
	perStream := flag.Int("per-stream", 5, "short: lock-step numbers per stream")
	inflight := flag.Int("inflight", 1000, "stream, concurrent: unanswered numbers per stream "+
		"(0: unbounded, i.e. up to the server's HTTP/2 window, which can hold 100,000s)")
	serverPid := flag.String("server-pid", "", "server processes (comma-separated pids) whose CPU time to report")
	watchGoAways := flag.Bool("goaways", false, "report the last-stream-id of every GOAWAY received")
	flag.Parse()
	// The first SIGINT or SIGTERM ends the measured window; a second one kills.
	signals, interrupted := make(chan os.Signal, 1), make(chan struct{})
	signal.Notify(signals, os.Interrupt, syscall.SIGTERM)
	go func() { <-signals; signal.Stop(signals); close(interrupted) }()

	nStreams, nConns := 1, 1
	switch *mode {
	case "pingpong", "stream":
	case "concurrent", "short", "pipelined-many":
		nStreams, nConns = *streams, *conns
	default:
		fmt.Fprintf(os.Stderr, "loadgen: unknown mode %q\n", *mode)
		os.Exit(2)
	}
	res := result{Mode: *mode, Client: "go", Streams: nStreams, Connections: nConns}
	r := &run{stop: make(chan struct{})}
	ctx, cancel := context.WithTimeout(context.Background(),
		time.Duration((*seconds+*warmup+60)*float64(time.Second)))
	defer cancel()

	log := &goAways{}
	dialOpts := []grpc.DialOption{grpc.WithInsecure(), grpc.WithBlock()}
	if *watchGoAways {
		dialOpts = append(dialOpts, grpc.WithContextDialer(
			func(ctx context.Context, address string) (net.Conn, error) {
				conn, err := (&net.Dialer{}).DialContext(ctx, "tcp", address)
				if err != nil {
					return nil, err
				}
				return &frameReader{Conn: conn, log: log}, nil
			}))
	}
	target, addrs := *addr, strings.Split(*addr, ",")
	if len(addrs) > 1 {
		target = "replicas:///" + *addr
		// Reconnect soon after a replica is back (grpc-go's backoff starts at 1 s).
		retry := backoff.DefaultConfig
		retry.BaseDelay, retry.MaxDelay = 100*time.Millisecond, 500*time.Millisecond
		dialOpts = append(dialOpts,
			grpc.WithDefaultServiceConfig(`{"loadBalancingConfig": [{"round_robin": {}}]}`),
			grpc.WithConnectParams(grpc.ConnectParams{Backoff: retry}))
	}
	ccs := make([]*grpc.ClientConn, nConns)
	for i := range ccs {
		opts := dialOpts
		if len(addrs) > 1 { // a resolver of its own for each connection
			replicas := manual.NewBuilderWithScheme("replicas")
			state := resolver.State{}
			for _, a := range addrs {
				state.Addresses = append(state.Addresses, resolver.Address{Addr: a})
			}
			replicas.InitialState(state)
			opts = append(append([]grpc.DialOption(nil), dialOpts...), grpc.WithResolvers(replicas))
		}
		dctx, dcancel := context.WithTimeout(ctx, 10*time.Second)
		cc, err := grpc.DialContext(dctx, target, opts...)
		dcancel()
		if err != nil {
			fmt.Fprintf(os.Stderr, "loadgen: cannot connect to %s: %v\n", *addr, err)
			os.Exit(1)
		}
		defer cc.Close()
		ccs[i] = cc
	}

	var wg sync.WaitGroup
	for s := 0; s < nStreams; s++ {
		wg.Add(1)
		go func(cc *grpc.ClientConn) {
			defer wg.Done()
			var err error
			switch *mode {
			case "pingpong":
				err = r.pingPong(ctx, cc)
			case "short":
				err = r.short(ctx, cc, *perStream)
			default:
				err = r.pipelined(ctx, cc, *inflight)
			}
			if err != nil {
				r.fail(err)
			}
		}(ccs[s%nConns])
	}

	sleepOrStop := func(d float64) {
		select {
		case <-time.After(time.Duration(d * float64(time.Second))):
		case <-r.stop:
		case <-interrupted:
		}
	}
	sleepOrStop(*warmup)
	atomic.StoreInt32(&r.measuring, 1)
	start, n0, c0, s0 := time.Now(), atomic.LoadInt64(&r.answered), cpuSelf(), cpuOf(*serverPid)
	f0 := atomic.LoadInt64(&r.finished)
	sleepOrStop(*seconds)
	elapsed, n1, c1, s1 := time.Since(start), atomic.LoadInt64(&r.answered), cpuSelf(), cpuOf(*serverPid)
	f1 := atomic.LoadInt64(&r.finished)
	atomic.StoreInt32(&r.measuring, 0)
	r.halt() // every stream: stop sending, drain, check the rest
	wg.Wait()

	res.Messages = n1 - n0
	res.Verified = atomic.LoadInt64(&r.answered)
	res.Seconds = elapsed.Seconds()
	res.MsgPerSec = float64(res.Messages) / res.Seconds
	res.StreamsDone = f1 - f0
	res.StreamsPerSec = float64(res.StreamsDone) / res.Seconds
	res.ClientCPUSeconds = c1 - c0
	res.ServerCPUSeconds = s1 - s0
	sort.Slice(r.latencies, func(i, j int) bool { return r.latencies[i] < r.latencies[j] })
	res.P50us = percentile(r.latencies, 0.50)
	res.P90us = percentile(r.latencies, 0.90)
	res.P99us = percentile(r.latencies, 0.99)
	if r.err != nil {
		res.Error = r.err.Error()
	}
	log.mu.Lock()
	res.GoAways = append([]uint32(nil), log.seen...)
	log.mu.Unlock()
	_ = json.NewEncoder(os.Stdout).Encode(res)
	if r.err != nil {
		os.Exit(1)
	}
}
