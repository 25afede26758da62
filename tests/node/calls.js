// Short AccumulateNumbers calls with grpc-js until stdin ends, for tests/test_graceful.py.
//
//   node calls.js TARGET CONCURRENCY
//
// TARGET is a grpc-js target ("ipv4:127.0.0.1:A,127.0.0.1:B"), balanced round robin.
// CONCURRENCY loops each make one call after another: three numbers, their sums
// checked. It prints "ready" once a call has succeeded, and when stdin ends, waits
// for the calls in flight and prints one JSON line: {"ok": N, "failed": [...]}.
// No generated code: requests are encoded and sums decoded here (field 1, a varint).
"use strict";
const grpc = require("@grpc/grpc-js");

const METHOD = "/tutorial.NumberService/AccumulateNumbers";
const CALL_TIMEOUT_MS = 20000;

function encode(num) {
  if (num === 0) return Buffer.alloc(0);
  let value = BigInt.asUintN(64, BigInt(num)); // a negative int32 goes out sign-extended
  const out = [0x08];
  while (value >= 0x80n) {
    out.push(Number(value & 0x7fn) | 0x80);
    value >>= 7n;
  }
  out.push(Number(value));
  return Buffer.from(out);
}

function decode(data) {
  if (data.length === 0) return 0;
  if (data[0] !== 0x08) throw new Error(`unexpected response ${data.toString("hex")}`);
  let value = 0n;
  let shift = 0n;
  for (let i = 1; i < data.length; i++) {
    value |= BigInt(data[i] & 0x7f) << shift;
    if (!(data[i] & 0x80)) break;
    shift += 7n;
  }
  return Number(BigInt.asIntN(32, value));
}

function call(client, numbers) {
  return new Promise((resolve, reject) => {
    const sums = [];
    const stream = client.makeBidiStreamRequest(METHOD, encode, decode, new grpc.Metadata(), {
      deadline: Date.now() + CALL_TIMEOUT_MS,
    });
    stream.on("data", (sum) => sums.push(sum));
    stream.on("error", reject);
    stream.on("status", (status) => {
      if (status.code === grpc.status.OK) resolve(sums);
    });
    for (const num of numbers) stream.write(num);
    stream.end();
  });
}

async function main() {
  const [target, concurrency] = process.argv.slice(2);
  const client = new grpc.Client(target, grpc.credentials.createInsecure(), {
    "grpc.service_config": JSON.stringify({ loadBalancingConfig: [{ round_robin: {} }] }),
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 500,
  });
  let stopped = false;
  process.stdin.on("data", () => {});
  process.stdin.on("end", () => {
    stopped = true;
  });
  let ok = 0;
  let ready = false;
  const failed = [];
  async function loop(index) {
    for (let k = index * 1000; !stopped; k++) {
      const numbers = [(k % 100) + 1, -7, 3];
      const want = [numbers[0], numbers[0] - 7, numbers[0] - 4];
      try {
        const sums = await call(client, numbers);
        if (JSON.stringify(sums) !== JSON.stringify(want)) {
          failed.push(`wrong sums ${JSON.stringify(sums)} for ${JSON.stringify(numbers)}`);
        } else {
          ok++;
          if (!ready) {
            ready = true;
            process.stdout.write("ready\n");
          }
        }
      } catch (err) {
        failed.push(`${grpc.status[err.code] || err.code}: ${err.details || err.message}`);
      }
    }
  }
  await Promise.all(Array.from({ length: Number(concurrency) }, (_, i) => loop(i)));
  client.close();
  process.stdout.write(JSON.stringify({ ok, failed }) + "\n");
}

main().catch((err) => {
  process.stderr.write(`calls.js: ${err.stack || err}\n`);
  process.exit(1);
});
