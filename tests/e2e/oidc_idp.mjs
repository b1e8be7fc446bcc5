// A real OpenID provider for the end-to-end tests: panva's certified `oidc-provider` with the device flow on
// (driven by test_oidc_provider.py). Serves plain HTTP on 127.0.0.1 only, on a free port.
//
//   node oidc_idp.mjs [--interval S | --no-interval] [--enforce-interval S]
//                     [--device-code-ttl S] [--access-token-ttl S]
//
// Once listening it prints one JSON line on stdout, {"issuer", "publicClientId", "confidentialClientId"},
// then one JSON line per device authorization, {"event":"device_authorization","status","interval"?}, and
// per token-endpoint request, {"event":"token","grantType","status","error"?} (never a code or a token),
// and stays up until stdin closes or SIGTERM/SIGINT arrives. The confidential client's
// secret comes from $OIDC_IDP_CLIENT_SECRET (the test's, so neither side prints it).
//
// What the provider does not do by itself, and this script adds:
// - `interval`: oidc-provider 9 sends none in the device authorization reply; --interval S adds one
//   (default 0.2 s, a fraction RFC 8628 does not forbid), --no-interval leaves the reply as the provider sent it.
// - slow_down: oidc-provider does not enforce the interval; --enforce-interval S answers `slow_down` to a
//   device-code poll that comes less than S seconds after the previous poll of the same code.
import { createServer } from 'node:http';
import { parseArgs } from 'node:util';
import { Buffer } from 'node:buffer';
import { parse as parseQuery } from 'node:querystring';
import Provider from 'oidc-provider';

// stdout is the tests' channel (JSON lines only): oidc-provider's notices (console.info) go to stderr.
console.log = console.error;
console.info = console.error;

const DEVICE_CODE_GRANT = 'urn:ietf:params:oauth:grant-type:device_code';
const PUBLIC_CLIENT_ID = 'qwen-serve-e2e-public';
const CONFIDENTIAL_CLIENT_ID = 'qwen-serve-e2e-confidential';
const NICKNAME = 'e2e-tester';

const { values: args } = parseArgs({
  options: {
    interval: { type: 'string', default: '0.2' },
    'no-interval': { type: 'boolean', default: false },
    'enforce-interval': { type: 'string' },
    'device-code-ttl': { type: 'string', default: '600' },
    'access-token-ttl': { type: 'string', default: '3600' },
  },
  strict: true,
});

function seconds(name, text) {
  const value = Number(text);
  if (!Number.isFinite(value) || value <= 0) {
    process.stderr.write(`oidc_idp.mjs: --${name} wants a positive number of seconds, got ${text}\n`);
    process.exit(2);
  }
  return value;
}

const interval = args['no-interval'] ? undefined : seconds('interval', args.interval);
const enforcedInterval = args['enforce-interval'] === undefined
  ? undefined : seconds('enforce-interval', args['enforce-interval']);
// oidc-provider's TTLs are whole seconds.
const deviceCodeTtl = Math.ceil(seconds('device-code-ttl', args['device-code-ttl']));
const accessTokenTtl = Math.ceil(seconds('access-token-ttl', args['access-token-ttl']));
const clientSecret = process.env.OIDC_IDP_CLIENT_SECRET;
if (!clientSecret) {
  process.stderr.write('oidc_idp.mjs: set OIDC_IDP_CLIENT_SECRET (the confidential client\'s secret)\n');
  process.exit(2);
}

const server = createServer();
await new Promise((resolve, reject) => {
  server.once('error', reject);
  server.listen(0, '127.0.0.1', resolve);
});
const issuer = `http://127.0.0.1:${server.address().port}`;

const grantTypes = [DEVICE_CODE_GRANT, 'refresh_token'];
const provider = new Provider(issuer, {
  clients: [
    {
      client_id: PUBLIC_CLIENT_ID,
      token_endpoint_auth_method: 'none',
      grant_types: grantTypes,
      response_types: [],
      redirect_uris: [],
    },
    {
      client_id: CONFIDENTIAL_CLIENT_ID,
      client_secret: clientSecret,
      token_endpoint_auth_method: 'client_secret_basic',
      grant_types: grantTypes,
      response_types: [],
      redirect_uris: [],
    },
  ],
  features: {
    deviceFlow: { enabled: true },
    devInteractions: { enabled: true }, // its built-in login and consent forms (any login, any password)
    revocation: { enabled: true },
    introspection: { enabled: true },
  },
  claims: { openid: ['sub'], profile: ['nickname', 'name'] },
  // The id token carries the scope's claims (by default they would be left to userinfo), so the daemon
  // derives its account alias from `nickname`.
  conformIdTokenClaims: false,
  findAccount: async (ctx, sub) => ({
    accountId: sub,
    claims: async () => ({ sub, nickname: NICKNAME, name: 'E2E Tester' }),
  }),
  // A refresh token for every client allowed the grant, with or without offline_access.
  issueRefreshToken: async (ctx, client) => client.grantTypeAllowed('refresh_token'),
  ttl: { DeviceCode: deviceCodeTtl, AccessToken: accessTokenTtl },
  cookies: { keys: ['qwen-serve-e2e-cookie-key'] },
});

function emit(line) {
  process.stdout.write(`${JSON.stringify(line)}\n`);
}

// The last poll of each device code (by the code itself, kept in memory here only).
const lastPoll = new Map();

provider.use(async (ctx, next) => {
  if (ctx.method === 'POST' && ctx.path === provider.pathFor('token')) {
    let grantType;
    if (enforcedInterval !== undefined && ctx.is('application/x-www-form-urlencoded')) {
      // Read the form here, then hand it on: oidc-provider reads an already parsed body from `req.body`.
      const chunks = [];
      for await (const chunk of ctx.req) chunks.push(chunk);
      const raw = Buffer.concat(chunks).toString('utf8');
      ctx.req.body = raw;
      const form = parseQuery(raw);
      grantType = form.grant_type;
      const code = typeof form.device_code === 'string' ? form.device_code : undefined;
      if (grantType === DEVICE_CODE_GRANT && code !== undefined) {
        const now = performance.now();
        const previous = lastPoll.get(code);
        lastPoll.set(code, now);
        if (previous !== undefined && now - previous < enforcedInterval * 1000) {
          ctx.status = 400;
          ctx.set('Cache-Control', 'no-store');
          ctx.body = { error: 'slow_down', error_description: 'polling too fast' };
          emit({ event: 'token', grantType, status: 400, error: 'slow_down' });
          return;
        }
      }
    }
    await next();
    grantType ??= ctx.oidc?.params?.grant_type;
    const line = { event: 'token', grantType: grantType ?? null, status: ctx.status };
    if (ctx.body && typeof ctx.body === 'object' && typeof ctx.body.error === 'string') {
      line.error = ctx.body.error;
    }
    emit(line);
    return;
  }
  await next();
  if (ctx.oidc?.route === 'device_authorization') {
    if (ctx.status === 200 && interval !== undefined) {
      ctx.body = { ...ctx.body, interval };
    }
    const line = { event: 'device_authorization', status: ctx.status };
    if (ctx.status === 200) line.interval = ctx.body.interval ?? null;
    emit(line);
  }
});

server.on('request', provider.callback());

function stop() {
  server.close();
  server.closeAllConnections();
  process.exit(0);
}

process.on('SIGTERM', stop);
process.on('SIGINT', stop);
process.stdin.on('end', stop);
process.stdin.on('error', stop);
process.stdin.resume();

emit({ issuer, publicClientId: PUBLIC_CLIENT_ID, confidentialClientId: CONFIDENTIAL_CLIENT_ID });
