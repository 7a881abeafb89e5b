// oidc-provider behind TLS that asks for a client certificate: mutual-TLS client authentication
// and certificate-bound access tokens (RFC 8705), for custody's mTLS end-to-end test
// (tests/oidc_mtls_e2e_test.cc). The client's TLS key is in custody.
//
//   node oidc_mtls_provider.mjs --tls_key=F --tls_cert=F --ca=F [--client_id=ID]
//       [--redirect_uri=URI] [--client_san_dns=NAME]
//
// One HTTPS server on 127.0.0.1 (issuer https://127.0.0.1:PORT): Node's TLS asks every client for
// a certificate chaining to --ca (requestCert) but lets the provider decide (rejectUnauthorized
// false): features.mTLS reads the peer certificate from the TLS socket, `tls_client_auth` checks
// that it was verified and that its SAN dNSName is the registered tls_client_auth_san_dns, and
// access tokens are bound to its SHA-256 thumbprint (cnf.x5t#S256), checked at userinfo.
// Interactions are approved automatically (login "alice", consent to what was asked).
//
// stdout: one JSON object per line: {"event":"ready","issuer":...} once listening, then the
// provider's successes and errors. SIGTERM/SIGINT exit.
import { randomBytes, generateKeyPairSync } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createServer } from 'node:https';
import { parseArgs } from 'node:util';

import Provider from 'oidc-provider';

const { values: args } = parseArgs({
  options: {
    tls_key: { type: 'string' },
    tls_cert: { type: 'string' },
    ca: { type: 'string' },
    client_id: { type: 'string', default: 'custody-mtls-client' },
    redirect_uri: { type: 'string', default: 'https://client.example/cb' },
    client_san_dns: { type: 'string', default: 'client.example' },
  },
});
if (!args.tls_key || !args.tls_cert || !args.ca) {
  console.error('usage: oidc_mtls_provider.mjs --tls_key=F --tls_cert=F --ca=F');
  process.exit(2);
}
const log = (event) => process.stdout.write(`${JSON.stringify(event)}\n`);

let provider;
let handleProviderRequest;
const server = createServer({
  key: readFileSync(args.tls_key),
  cert: readFileSync(args.tls_cert),
  ca: readFileSync(args.ca),
  requestCert: true,
  rejectUnauthorized: false,
}, (req, res) => {
  if (req.url.startsWith('/interaction/')) {
    approveInteraction(req, res).catch((err) => {
      log({ event: 'interaction.failed', error: String(err) });
      res.writeHead(500).end();
    });
    return;
  }
  handleProviderRequest(req, res);
});
const port = await new Promise((resolve, reject) => {
  server.once('error', reject);
  server.listen(0, '127.0.0.1', () => resolve(server.address().port));
});
const issuer = `https://127.0.0.1:${port}`;

// The peer certificate of this request's TLS connection (undefined when none was sent).
const peerCertificate = (ctx) => {
  const cert = ctx.req.socket.getPeerX509Certificate?.();
  return cert ?? undefined;
};

const providerKey = {
  ...generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey.export({ format: 'jwk' }),
  use: 'sig',
  alg: 'ES256',
  kid: 'op',
};

provider = new Provider(issuer, {
  clients: [{
    client_id: args.client_id,
    redirect_uris: [args.redirect_uri],
    response_types: ['code'],
    grant_types: ['authorization_code'],
    token_endpoint_auth_method: 'tls_client_auth',
    tls_client_auth_san_dns: args.client_san_dns,
    tls_client_certificate_bound_access_tokens: true,
    id_token_signed_response_alg: 'ES256',
  }],
  jwks: { keys: [providerKey] },
  clientAuthMethods: ['tls_client_auth'],
  responseTypes: ['code'],
  pkce: { required: () => true },
  features: {
    mTLS: {
      enabled: true,
      certificateBoundAccessTokens: true,
      tlsClientAuth: true,
      getCertificate: peerCertificate,
      certificateAuthorized: (ctx) => ctx.req.socket.authorized === true,
      certificateSubjectMatches: (ctx, property, expected) => {
        const cert = peerCertificate(ctx);
        if (!cert || property !== 'tls_client_auth_san_dns') return false;
        return (cert.subjectAltName ?? '').split(', ').includes(`DNS:${expected}`);
      },
    },
    introspection: { enabled: true },
    devInteractions: { enabled: false },
  },
  enabledJWA: { idTokenSigningAlgValues: ['ES256'] },
  scopes: ['openid', 'profile'],
  claims: { openid: ['sub'], profile: ['name'] },
  findAccount: async (_ctx, sub) => ({
    accountId: sub,
    claims: async () => ({ sub, name: 'Alice Example' }),
  }),
  interactions: { url: (_ctx, interaction) => `/interaction/${interaction.uid}` },
  cookies: { keys: [randomBytes(32).toString('base64url')] },
});

async function approveInteraction(req, res) {
  const { params } = await provider.interactionDetails(req, res);
  const grant = new provider.Grant({ accountId: 'alice', clientId: params.client_id });
  grant.addOIDCScope(String(params.scope));
  const grantId = await grant.save();
  await provider.interactionFinished(
    req,
    res,
    { login: { accountId: 'alice' }, consent: { grantId } },
    { mergeWithLastSubmission: false },
  );
}

for (const name of ['grant.success', 'authorization.success']) {
  provider.on(name, () => log({ event: name }));
}
provider.use(async (ctx, next) => {
  await next();
  if (ctx.oidc?.route === 'userinfo' && ctx.status === 200) log({ event: 'userinfo.success' });
});
for (const name of ['authorization.error', 'grant.error', 'userinfo.error', 'introspection.error',
  'server_error']) {
  provider.on(name, (_ctx, err) => log({
    event: name,
    error: err.error ?? err.name,
    description: err.error_description ?? err.message,
    detail: err.error_detail,
  }));
}
for (const signal of ['SIGTERM', 'SIGINT']) process.on(signal, () => process.exit(0));

handleProviderRequest = provider.callback();
log({ event: 'ready', issuer });
