// A Node.js client for custodyd (custody.v1), for authorization servers written in JavaScript.
//
// What it adds to the service definitions @grpc/proto-loader reads from custody.proto:
//
// - Deadlines: every call has one overall deadline (default 5 s) covering every attempt.
// - An address list with failover: `new Client(['unix:/run/a.sock', '10.0.0.2:8443'])` keeps a
//   connection per replica and sends each call to the replica that last answered. The
//   idempotent calls (signJws, sign, decryptJwe, getJwks, getKeyRing) are retried on the next
//   replica after UNAVAILABLE until the deadline, with a jittered backoff once every replica was
//   tried. Lifecycle calls (KeyAdmin create, rotate, disable, ...) are not offered: they belong
//   to custodyctl and are never retried (a first attempt may have committed).
// - A JWKS cache fed by WatchJwks: `new JwksCache(client, rings)` holds the latest published
//   JWK Set of the rings, pushed by custodyd on every change, and subscribes again (on another
//   replica if need be) when the stream ends.
//
// Errors are CustodyError with the gRPC status code (a number; codeName its name) and
// custodyd's message; docs/api.md lists them per RPC.
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';

const here = path.dirname(fileURLToPath(import.meta.url));

// Where custody/v1/custody.proto is: CUSTODY_PROTO_ROOT, else the source tree's proto/, else
// an installed share/custody/proto.
function defaultProtoRoot() {
  for (const dir of [process.env.CUSTODY_PROTO_ROOT, path.join(here, '../../proto'),
    '/usr/local/share/custody/proto', '/usr/share/custody/proto']) {
    if (!dir) continue;
    try {
      readFileSync(path.join(dir, 'custody/v1/custody.proto'));
      return dir;
    } catch {
      // next
    }
  }
  throw new Error('custody/v1/custody.proto not found: set CUSTODY_PROTO_ROOT');
}

export class CustodyError extends Error {
  constructor(code, details) {
    const codeName = Object.keys(grpc.status).find((k) => grpc.status[k] === code) ?? 'UNKNOWN';
    super(`${codeName}: ${details}`);
    this.code = code;
    this.codeName = codeName;
    this.details = details;
  }
}

function splitAddresses(addresses) {
  const list = (Array.isArray(addresses) ? addresses : String(addresses).split(','))
    .map((a) => a.trim())
    .filter((a) => a.length > 0);
  if (list.length === 0) throw new Error('no custodyd address');
  return list;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const jitter = () => 0.8 + Math.random() * 0.4;

export class Client {
  // addresses: an array, or a comma-separated string, of gRPC targets ('unix:/path',
  // 'host:port'). options: deadlineMs (per call, every attempt included), credentials
  // (grpc.credentials.createSsl(...) for TLS/mTLS; insecure for a Unix socket or loopback),
  // protoRoot (the directory holding custody/v1/custody.proto).
  constructor(addresses, { deadlineMs = 5000, credentials, protoRoot, initialBackoffMs = 50,
    maxBackoffMs = 1000 } = {}) {
    this.addresses = splitAddresses(addresses);
    this.deadlineMs = deadlineMs;
    this.initialBackoffMs = initialBackoffMs;
    this.maxBackoffMs = maxBackoffMs;
    const definition = protoLoader.loadSync('custody/v1/custody.proto', {
      includeDirs: [protoRoot ?? defaultProtoRoot()],
      keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true,
    });
    const v1 = grpc.loadPackageDefinition(definition).custody.v1;
    const creds = credentials ?? grpc.credentials.createInsecure();
    // A replica that comes back is reconnected to within a second.
    const options = {
      'grpc.initial_reconnect_backoff_ms': 100,
      'grpc.max_reconnect_backoff_ms': 1000,
      'grpc.max_receive_message_length': 16 * 1024 * 1024,
    };
    this.signers = this.addresses.map((a) => new v1.Signer(a, creds, options));
    // KeyAdmin shares the Signer's channel (one connection per replica).
    this.admins = this.signers.map((s) => new v1.KeyAdmin(null, null,
      { channelOverride: s.getChannel() }));
    this.current = 0;
  }

  close() {
    for (const s of this.signers) s.close();
  }

  // The index in addresses of the replica calls go to now.
  replica() {
    return this.current;
  }

  // Signer.SignJws: a compact JWS of payload (Buffer or string) with the ring's ACTIVE key.
  async signJws(ring, payload, { typ = '', cty = '', extraHeader, deadlineMs } = {}) {
    const request = {
      ring, payload: Buffer.from(payload), typ, cty,
      extra_header_json: extraHeader ? JSON.stringify(extraHeader) : '',
    };
    const r = await this.#idempotent((i, d) => this.#unary(this.signers[i], 'SignJws', request, d),
      deadlineMs);
    return { jws: r.jws, kid: r.kid, version: r.version, alg: r.alg };
  }

  // Signer.Sign: a raw JOSE-encoded signature over data (or { digest }).
  async sign(ring, { data, digest, deadlineMs } = {}) {
    const request = digest ? { ring, digest } : { ring, data: Buffer.from(data) };
    return this.#idempotent((i, d) => this.#unary(this.signers[i], 'Sign', request, d), deadlineMs);
  }

  // Signer.DecryptJwe of a compact JWE; every decryption failure is the same INVALID_ARGUMENT
  // "decryption failed".
  async decryptJwe(ring, jwe, { deadlineMs } = {}) {
    const request = { ring, jwe: jwe.trim() };
    const r = await this.#idempotent(
      (i, d) => this.#unary(this.signers[i], 'DecryptJwe', request, d), deadlineMs);
    return {
      plaintext: r.plaintext, protectedHeader: JSON.parse(r.protected_header), kid: r.kid,
      version: r.version,
    };
  }

  // Signer.GetJwks of the rings (every ring the caller may read when empty).
  async getJwks(rings = [], { deadlineMs } = {}) {
    const r = await this.#idempotent(
      (i, d) => this.#unary(this.signers[i], 'GetJwks', { rings }, d), deadlineMs);
    return { jwks: JSON.parse(r.jwks), etag: r.etag, maxAgeSeconds: r.max_age_seconds };
  }

  // KeyAdmin.GetKeyRing (a read): the custody.v1.KeyRing message as an object.
  async getKeyRing(name, { deadlineMs } = {}) {
    return this.#idempotent((i, d) => this.#unary(this.admins[i], 'GetKeyRing', { name }, d),
      deadlineMs);
  }

  // The replica at index failed: move on to the next one (unless another call already has).
  failed(index) {
    if (this.current === index) this.current = (index + 1) % this.addresses.length;
  }

  watch(index, rings) {
    return this.signers[index].WatchJwks({ rings });
  }

  #unary(stub, method, request, deadline) {
    return new Promise((resolve, reject) => {
      stub[method](request, { deadline }, (error, response) => {
        if (error) reject(error);
        else resolve(response);
      });
    });
  }

  async #idempotent(call, deadlineMs) {
    const end = Date.now() + (deadlineMs ?? this.deadlineMs);
    let backoff = this.initialBackoffMs;
    for (let tried = 1; ; ++tried) {
      const index = this.current;
      try {
        return await call(index, new Date(end));
      } catch (error) {
        if (error.code !== grpc.status.UNAVAILABLE || Date.now() >= end - 1) {
          throw new CustodyError(error.code, error.details);
        }
      }
      this.failed(index);
      if (tried % this.addresses.length === 0) {  // every replica failed once: back off
        await sleep(Math.min(Math.min(backoff, this.maxBackoffMs) * jitter(),
          (end - Date.now()) / 2));
        backoff *= 2;
      }
    }
  }
}

// The published JWK Set of some rings (all when empty), kept current by WatchJwks. start()
// resolves once the first JWKS arrived (rejects after the client's deadline); every push
// replaces the set; when the stream ends it subscribes again on the next replica, backing off
// up to a second. stop() ends it.
export class JwksCache {
  constructor(client, rings = []) {
    this.client = client;
    this.rings = rings;
    this.set = null;
    this.updatedAt = 0;
    this.stopped = false;
    this.call = null;
    this.waiters = new Set();
    this.backoff = 50;
  }

  async start() {
    this.#subscribe();
    if (!(await this.waitFor(() => true, this.client.deadlineMs))) {
      this.stop();
      throw new CustodyError(grpc.status.DEADLINE_EXCEEDED, 'no JWKS from any replica');
    }
    return this;
  }

  stop() {
    this.stopped = true;
    if (this.call) this.call.cancel();
    for (const w of this.waiters) w();
  }

  jwks() {
    return this.set;
  }

  key(kid) {
    return this.set?.keys.find((k) => k.kid === kid) ?? null;
  }

  // Resolves true once pred(set) holds, false after timeoutMs or stop().
  waitFor(pred, timeoutMs) {
    return new Promise((resolve) => {
      const check = () => {
        if (this.set !== null && pred(this.set)) return done(true);
        if (this.stopped) return done(false);
        return undefined;
      };
      const timer = setTimeout(() => done(false), timeoutMs);
      const done = (ok) => {
        clearTimeout(timer);
        this.waiters.delete(check);
        resolve(ok);
      };
      this.waiters.add(check);
      check();
    });
  }

  #subscribe() {
    if (this.stopped) return;
    const index = this.client.replica();
    const call = this.client.watch(index, this.rings);
    this.call = call;
    call.on('data', (message) => {
      this.set = JSON.parse(message.jwks);
      this.updatedAt = Date.now();
      this.backoff = 50;
      for (const w of [...this.waiters]) w();
    });
    let ended = false;
    const again = () => {
      if (ended) return;
      ended = true;
      if (this.stopped) return;
      this.client.failed(index);
      const wait = this.backoff * jitter();
      this.backoff = Math.min(this.backoff * 2, 1000);
      setTimeout(() => this.#subscribe(), wait).unref();
    };
    call.on('error', again);  // CANCELLED by stop(), or the replica went away
    call.on('end', again);    // custodyd shutting down
  }
}
