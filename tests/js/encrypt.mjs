// Encrypts a plaintext to a JWKS key with the npm `jose` package (an independent JOSE stack).
// usage: node encrypt.mjs JWKS_FILE KID ALG PLAINTEXT_FILE ENC [ENC...]  → one compact JWE a line
import { readFileSync } from 'node:fs';
import { CompactEncrypt, importJWK } from 'jose';

const [jwksFile, kid, alg, plaintextFile, ...encs] = process.argv.slice(2);
const jwks = JSON.parse(readFileSync(jwksFile, 'utf8'));
const jwk = jwks.keys.find((k) => k.kid === kid);
if (!jwk) {
  console.error(`kid ${kid} not in JWKS`);
  process.exit(1);
}
const key = await importJWK(jwk, alg);
const plaintext = readFileSync(plaintextFile);
for (const enc of encs) {
  const jwe = await new CompactEncrypt(plaintext)
    .setProtectedHeader({ alg, enc, kid })
    .encrypt(key);
  console.log(jwe);
}
