// Verifies a JWT with npm jose (an independent implementation). Run with cwd = tests/js so that
// 'jose' resolves, script on stdin (`node --input-type=module -`). Inputs in the environment:
//   JWT, JWKS (a JWK Set), ISS, AUD, TYP (optional checks), MODE=dpop (key from the header
//   "jwk", whose RFC 7638 thumbprint must equal KID). Prints {"header","payload"} on success.
import * as jose from 'jose';

const e = process.env;
const opts = {};
if (e.ISS) opts.issuer = e.ISS;
if (e.AUD) opts.audience = e.AUD;
if (e.TYP) opts.typ = e.TYP;
try {
  let r;
  if (e.MODE === 'dpop') {
    r = await jose.jwtVerify(e.JWT, jose.EmbeddedJWK, opts);
    const tp = await jose.calculateJwkThumbprint(r.protectedHeader.jwk, 'sha256');
    if (tp !== e.KID) throw new Error(`jwk thumbprint ${tp} != ring kid ${e.KID}`);
    // The embedded key must also be the published one.
    const set = jose.createLocalJWKSet(JSON.parse(e.JWKS));
    await jose.jwtVerify(e.JWT, set, opts);
  } else {
    r = await jose.jwtVerify(e.JWT, jose.createLocalJWKSet(JSON.parse(e.JWKS)), opts);
  }
  console.log(JSON.stringify({header: r.protectedHeader, payload: r.payload}));
} catch (err) {
  console.error(`${err.code ?? ''} ${err.message}`);
  process.exit(1);
}
