// custody_client.mjs against a real custodyd (run by tests/language_clients_test.cc, which starts
// replicas on PostgreSQL and creates the rings with custodyctl: this test creates nothing).
//
// Environment: CUSTODY_ADDRS (the replicas, comma-separated), CUSTODY_SIGN_RING (ES256),
// CUSTODY_ENC_RING (ECDH-ES+A128KW), CUSTODY_PROTO_ROOT; for the failover test CUSTODY_KILL_PID
// (the replica at the first address); for the rotation test CUSTODYCTL (the binary).
// Tokens are checked with npm `jose`, an independent JOSE implementation.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { test } from 'node:test';
import {
  CompactEncrypt, calculateJwkThumbprint, createLocalJWKSet, decodeProtectedHeader, importJWK,
  jwtVerify,
} from 'jose';
import { Client, CustodyError, JwksCache } from '../custody_client.mjs';

const env = process.env;
const ring = env.CUSTODY_SIGN_RING;
const claimsNow = (extra = {}) => {
  const now = Math.floor(Date.now() / 1000);
  return { iss: 'https://op.example', aud: 'client-1', iat: now, exp: now + 300, ...extra };
};

async function verify(jws, jwks) {
  const { kid } = decodeProtectedHeader(jws);
  const key = jwks.keys.find((k) => k.kid === kid);
  assert.ok(key, `kid ${kid} not in the JWKS`);
  assert.equal(await calculateJwkThumbprint(key), kid);
  const { payload, protectedHeader } = await jwtVerify(jws, createLocalJWKSet(jwks), {
    issuer: 'https://op.example', audience: 'client-1', algorithms: ['ES256'],
  });
  return { payload, protectedHeader };
}

function withClient(fn) {
  return async () => {
    const client = new Client(env.CUSTODY_ADDRS, { deadlineMs: 5000 });
    try {
      await fn(client);
    } finally {
      client.close();
    }
  };
}

test('signs an ID token that jose verifies', withClient(async (client) => {
  const claims = claimsNow({ sub: 'alice', nonce: 'n-0S6_WzA2Mj' });
  const signed = await client.signJws(ring, JSON.stringify(claims), { typ: 'JWT' });
  assert.equal(signed.alg, 'ES256');
  const cache = await new JwksCache(client, [ring]).start();
  try {
    const { payload, protectedHeader } = await verify(signed.jws, cache.jwks());
    assert.equal(protectedHeader.typ, 'JWT');
    assert.equal(protectedHeader.kid, signed.kid);
    assert.deepEqual(payload, claims);
  } finally {
    cache.stop();
  }
  await assert.rejects(client.signJws(ring, '{}', { extraHeader: { alg: 'none' } }),
    (e) => e instanceof CustodyError && e.codeName === 'INVALID_ARGUMENT');
  await assert.rejects(client.signJws('no/such-ring', '{}'),
    (e) => e instanceof CustodyError && e.codeName === 'NOT_FOUND');
}));

test('decrypts a JWE that jose made', withClient(async (client) => {
  const encRing = env.CUSTODY_ENC_RING;
  const { jwks } = await client.getJwks([encRing]);
  const publicJwk = jwks.keys[0];
  const plaintext = Buffer.from('{"request":"object","n":2}');
  const jwe = await new CompactEncrypt(plaintext)
    .setProtectedHeader({ alg: 'ECDH-ES+A128KW', enc: 'A256GCM', kid: publicJwk.kid })
    .encrypt(await importJWK(publicJwk, 'ECDH-ES+A128KW'));
  const got = await client.decryptJwe(encRing, jwe);
  assert.deepEqual(Buffer.from(got.plaintext), plaintext);
  assert.equal(got.kid, publicJwk.kid);
  assert.equal(got.protectedHeader.enc, 'A256GCM');
  const parts = jwe.split('.');
  parts[3] = parts[3].slice(0, -2) + (parts[3].endsWith('AA') ? 'BB' : 'AA');
  await assert.rejects(client.decryptJwe(encRing, parts.join('.')),
    (e) => e.codeName === 'INVALID_ARGUMENT' && e.details.includes('decryption failed'));
}));

test('fails over when a replica is killed', { skip: !env.CUSTODY_KILL_PID },
  withClient(async (client) => {
    const { jwks } = await client.getJwks([ring]);
    assert.equal(client.replica(), 0);
    const failures = [];
    let verified = 0;
    for (let n = 0; n < 40; ++n) {
      if (n === 10) process.kill(Number(env.CUSTODY_KILL_PID), 'SIGKILL');
      const claims = claimsNow({ sub: `u${n}` });
      try {
        const signed = await client.signJws(ring, JSON.stringify(claims), { typ: 'JWT' });
        assert.deepEqual((await verify(signed.jws, jwks)).payload, claims);
        await client.getJwks([ring]);
        assert.equal((await client.getKeyRing(ring)).name, ring);
        ++verified;
      } catch (e) {
        failures.push(`call ${n}: ${e.message}`);
      }
    }
    assert.deepEqual(failures, []);
    assert.equal(verified, 40);
    assert.notEqual(client.replica(), 0, 'calls still go to the killed replica');
  }));

test('the JWKS cache follows a rotation', { skip: !env.CUSTODYCTL },
  withClient(async (client) => {
    const cache = await new JwksCache(client, [ring]).start();
    try {
      const old = (await client.signJws(ring, '{}')).kid;
      execFileSync(env.CUSTODYCTL, [`--addr=${client.addresses.at(-1)}`, 'ring', 'rotate', ring,
        '--force'], { timeout: 30000 });
      let signed = await client.signJws(ring, '{}');
      for (const end = Date.now() + 10000; signed.kid === old && Date.now() < end;) {
        await new Promise((r) => setTimeout(r, 50));
        signed = await client.signJws(ring, '{}');
      }
      assert.notEqual(signed.kid, old);
      assert.ok(await cache.waitFor((s) => s.keys.some((k) => k.kid === signed.kid), 10000),
        `the cache never showed ${signed.kid}`);
      const claims = claimsNow();
      const token = await client.signJws(ring, JSON.stringify(claims));
      assert.deepEqual((await verify(token.jws, cache.jwks())).payload, claims);
    } finally {
      cache.stop();
    }
  }));
