// oidc-provider (the OpenID-certified Node.js authorization server) configured as a FAPI 2.0
// authorization server for custody's end-to-end test (tests/oidc_e2e_test.cc).
//
//   node oidc_provider.mjs --client_jwks_file=PATH [--port=0] [--client_id=custody-fapi-client]
//       [--redirect_uri=https://client.example/cb] [--client_jwks_uri=URL]
//
// Two HTTP servers on 127.0.0.1:
// - the authorization server (issuer http://127.0.0.1:PORT), FAPI 2.0 Security Profile: PAR
//   required, signed request objects required, private_key_jwt (aud = issuer), PKCE S256, DPoP
//   (with server nonces) and DPoP-bound access tokens, ID tokens signed ES256 by the provider's
//   own key (generated here) and encrypted RSA-OAEP-256 + A256GCM to the client's key;
//   interactions are approved automatically (login "alice", consent to what was asked);
// - the client's web host, serving the client's JWKS at /jwks from --client_jwks_file (re-read
//   at every request, so the test publishes rotations by rewriting the file). The provider
//   learns the client's keys only by fetching this jwks_uri. With --client_jwks_uri the client is
//   registered with that jwks_uri instead (custodyd's --jwks_listen; https is trusted through
//   NODE_EXTRA_CA_CERTS), and the file is not served.
//
// stdout: one JSON object per line: {"event":"ready",...} once both servers listen, then the
// provider's events (successes with the kids of the client's artifacts, every error with its
// description) and every fetch of the client's JWKS. SIGUSR2 expires the provider's cached copy
// of the client's JWKS, as its (minimum 60 s) cache lifetime passing would, so that the next use
// refetches jwks_uri. SIGTERM/SIGINT exit.
import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { parseArgs } from 'node:util';

import { calculateJwkThumbprint, decodeProtectedHeader } from 'jose';
import Provider from 'oidc-provider';

const { values: args } = parseArgs({
  options: {
    port: { type: 'string', default: '0' },
    client_id: { type: 'string', default: 'custody-fapi-client' },
    redirect_uri: { type: 'string', default: 'https://client.example/cb' },
    client_jwks_file: { type: 'string' },
    client_jwks_uri: { type: 'string' },
  },
});
if (!args.client_jwks_file) {
  console.error('usage: oidc_provider.mjs --client_jwks_file=PATH [--port=N] [--client_id=ID]');
  process.exit(2);
}

const log = (event) => process.stdout.write(`${JSON.stringify(event)}\n`);
const listen = (server, port) => new Promise((resolve, reject) => {
  server.once('error', reject);
  server.listen(port, '127.0.0.1', () => resolve(server.address().port));
});
const kidOf = (jws) => {
  try {
    return decodeProtectedHeader(jws).kid;
  } catch {
    return undefined;
  }
};

// The client's web host: its JWKS, exactly as custody published it (the test writes the file).
const clientHost = createServer((req, res) => {
  if (req.method !== 'GET' || req.url !== '/jwks') {
    res.writeHead(404).end();
    return;
  }
  try {
    const body = readFileSync(args.client_jwks_file, 'utf8');
    log({ event: 'client_jwks.served', kids: JSON.parse(body).keys.map((k) => k.kid) });
    res.writeHead(200, { 'content-type': 'application/json' }).end(body);
  } catch (err) {
    log({ event: 'client_jwks.failed', error: String(err) });
    res.writeHead(500).end();
  }
});
const clientJwksUri = args.client_jwks_uri ?? `http://127.0.0.1:${await listen(clientHost, 0)}/jwks`;

let provider;
let handleProviderRequest;
const asServer = createServer((req, res) => {
  if (req.url.startsWith('/interaction/')) {
    approveInteraction(req, res).catch((err) => {
      log({ event: 'interaction.failed', error: String(err) });
      res.writeHead(500).end();
    });
    return;
  }
  handleProviderRequest(req, res);
});
const issuer = `http://127.0.0.1:${await listen(asServer, Number(args.port))}`;

// The provider's own ID token signing key: the provider's, not custody's.
const providerKey = {
  ...generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey.export({ format: 'jwk' }),
  use: 'sig',
  alg: 'ES256',
};
providerKey.kid = await calculateJwkThumbprint(providerKey);

provider = new Provider(issuer, {
  clients: [{
    client_id: args.client_id,
    redirect_uris: [args.redirect_uri],
    response_types: ['code'],
    grant_types: ['authorization_code'],
    jwks_uri: clientJwksUri,
    token_endpoint_auth_method: 'private_key_jwt',
    token_endpoint_auth_signing_alg: 'ES256',
    request_object_signing_alg: 'ES256',
    require_signed_request_object: true,
    require_pushed_authorization_requests: true,
    dpop_bound_access_tokens: true,
    id_token_signed_response_alg: 'ES256',
    id_token_encrypted_response_alg: 'RSA-OAEP-256',
    id_token_encrypted_response_enc: 'A256GCM',
  }],
  jwks: { keys: [providerKey] },
  clientAuthMethods: ['private_key_jwt'],
  responseTypes: ['code'],
  features: {
    fapi: { enabled: true, profile: '2.0' },
    pushedAuthorizationRequests: { enabled: true, requirePushedAuthorizationRequests: true },
    requestObjects: { enabled: true, requireSignedRequestObject: true },
    dPoP: { enabled: true, nonceSecret: randomBytes(32), requireNonce: () => true },
    encryption: { enabled: true },
    devInteractions: { enabled: false },
  },
  enabledJWA: {
    clientAuthSigningAlgValues: ['ES256', 'PS256'],
    requestObjectSigningAlgValues: ['ES256', 'PS256'],
    idTokenSigningAlgValues: ['ES256', 'PS256'],
    idTokenEncryptionAlgValues: ['RSA-OAEP-256'],
    idTokenEncryptionEncValues: ['A256GCM'],
    dPoPSigningAlgValues: ['ES256', 'PS256'],
  },
  scopes: ['openid', 'profile', 'email'],
  claims: { openid: ['sub'], profile: ['name'], email: ['email', 'email_verified'] },
  findAccount: async (_ctx, sub) => ({
    accountId: sub,
    claims: async () => ({ sub, name: 'Alice Example', email: 'alice@example.com', email_verified: true }),
  }),
  interactions: { url: (_ctx, interaction) => `/interaction/${interaction.uid}` },
  cookies: { keys: [randomBytes(32).toString('base64url')] },
  // oidc-provider refuses outgoing requests to special-use addresses (SSRF protection, passed in
  // options.dispatcher); the client's jwks_uri is on loopback by design, so this one URL, and only
  // it, is fetched without that guard.
  fetch: (url, options) => {
    if (url !== clientJwksUri) throw new Error(`refusing to fetch ${url}`);
    log({ event: 'client_jwks.fetch', url });
    const response = globalThis.fetch(url, { ...options, dispatcher: undefined });
    if (!args.client_jwks_uri) return response;
    // Served by custodyd rather than the file host: reported the same way, from the response.
    return response.then(async (res) => {
      try {
        const body = await res.clone().json();
        log({
          event: 'client_jwks.served', status: res.status, etag: res.headers.get('etag'),
          kids: body.keys.map((k) => k.kid),
        });
      } catch (err) {
        log({ event: 'client_jwks.failed', status: res.status, error: String(err) });
      }
      return res;
    }, (err) => {
      log({ event: 'client_jwks.failed', error: String(err?.cause ?? err) });
      throw err;
    });
  },
});

// Login as "alice" and consent to every scope and claim the request asked for.
async function approveInteraction(req, res) {
  const { prompt, params } = await provider.interactionDetails(req, res);
  const grant = new provider.Grant({ accountId: 'alice', clientId: params.client_id });
  grant.addOIDCScope(String(params.scope));
  if (prompt.details.missingOIDCClaims) grant.addOIDCClaims(prompt.details.missingOIDCClaims);
  const grantId = await grant.save();
  log({ event: 'interaction.approved', prompt: prompt.name });
  await provider.interactionFinished(
    req,
    res,
    { login: { accountId: 'alice' }, consent: { grantId } },
    { mergeWithLastSubmission: false },
  );
}

const artifacts = async (ctx) => {
  const body = ctx.oidc?.body ?? {};
  const dpop = ctx.get('DPoP');
  return {
    client_assertion_kid: body.client_assertion ? kidOf(body.client_assertion) : undefined,
    request_object_kid: body.request ? kidOf(body.request) : undefined,
    dpop_jkt: dpop ? await calculateJwkThumbprint(decodeProtectedHeader(dpop).jwk) : undefined,
  };
};
for (const name of ['pushed_authorization_request.success', 'grant.success']) {
  provider.on(name, async (ctx) => log({ event: name, ...(await artifacts(ctx)) }));
}
provider.on('authorization.success', () => log({ event: 'authorization.success' }));
// Userinfo has no success event: reported from the response.
provider.use(async (ctx, next) => {
  await next();
  if (ctx.oidc?.route === 'userinfo' && ctx.status === 200) {
    log({ event: 'userinfo.success', ...(await artifacts(ctx)) });
  }
});
for (const name of [
  'pushed_authorization_request.error', 'authorization.error', 'grant.error', 'userinfo.error',
  'discovery.error', 'jwks.error', 'server_error',
]) {
  provider.on(name, (_ctx, err) => log({
    event: name,
    error: err.error ?? err.name,
    description: err.error_description ?? err.message,
    detail: err.error_detail ?? err.cause?.message,
  }));
}

// The provider's client keystore refetches jwks_uri once `freshUntil` (epoch seconds: the fetch
// time plus max(60, the response's max-age/Expires)) has passed; 0 makes it stale now.
process.on('SIGUSR2', () => {
  provider.Client.find(args.client_id).then((client) => {
    client.asymmetricKeyStore.freshUntil = 0;
    log({ event: 'client_jwks.cache_expired' });
  }, (err) => log({ event: 'client_jwks.cache_expiry.failed', error: String(err) }));
});
for (const signal of ['SIGTERM', 'SIGINT']) process.on(signal, () => process.exit(0));

handleProviderRequest = provider.callback();  // after provider.use: koa composes here
log({ event: 'ready', issuer, client_jwks_uri: clientJwksUri, provider_kid: providerKey.kid });
