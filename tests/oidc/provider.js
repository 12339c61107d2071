// A real OpenID provider for the tests (the npm `oidc-provider` package), not a mock:
// authorization code with PKCE required, signed ID tokens, JWKS, and static users
// whose `groups` claim the server maps to roles. Its development sign-in form takes
// any password; the login is the account id.
//
// node provider.js MODULES_DIR PORT CLIENT_ID CLIENT_SECRET REDIRECT_URI
// Listens on 127.0.0.1 and ::1, so that http://localhost:PORT works whichever
// address a client tries first; prints "ready" when it does.
import http from 'node:http';
import path from 'node:path';
import { pathToFileURL } from 'node:url';

const [modulesDir, port, clientId, clientSecret, redirectUri] = process.argv.slice(2);
const entry = path.join(modulesDir, 'node_modules', 'oidc-provider', 'lib', 'index.js');
const { default: Provider } = await import(pathToFileURL(entry).href);

const USERS = {
  'dana-ic': ['incident-commanders', 'staff'],
  'ari-approver': ['approvers', 'staff'],
  'sam-sre': ['sre', 'staff'],
  'employee-1': ['staff'],
  'casey-contractor': ['contractors'],
};

const issuer = `http://localhost:${port}`;
const provider = new Provider(issuer, {
  clients: [{
    client_id: clientId,
    client_secret: clientSecret,
    redirect_uris: [redirectUri],
    grant_types: ['authorization_code'],
    response_types: ['code'],
  }],
  pkce: { required: () => true },
  claims: { openid: ['sub'], profile: ['preferred_username', 'name'], groups: ['groups'] },
  scopes: ['openid', 'profile', 'groups'],
  // The claims asked for by scope go in the ID token itself (no userinfo call).
  conformIdTokenClaims: false,
  features: { devInteractions: { enabled: true } },
  async findAccount(ctx, id) {
    if (!(id in USERS)) return undefined;
    return {
      accountId: id,
      async claims() {
        return { sub: id, preferred_username: id, name: id, groups: USERS[id] };
      },
    };
  },
  // The company's own dashboard: no consent screen.
  async loadExistingGrant(ctx) {
    const grantId = ctx.oidc.result?.consent?.grantId
      || ctx.oidc.session.grantIdFor(ctx.oidc.client.clientId);
    if (grantId) return ctx.oidc.provider.Grant.find(grantId);
    const grant = new ctx.oidc.provider.Grant({
      clientId: ctx.oidc.client.clientId,
      accountId: ctx.oidc.session.accountId,
    });
    grant.addOIDCScope('openid profile groups');
    await grant.save();
    return grant;
  },
});

const callback = provider.callback();
let listening = 0;
for (const host of ['127.0.0.1', '::1']) {
  http.createServer(callback).listen(Number(port), host, () => {
    listening += 1;
    if (listening === 2) console.log('ready');
  }).on('error', (err) => {
    if (host === '::1' && err.code === 'EADDRNOTAVAIL') { // no IPv6 loopback here
      listening += 1;
      if (listening === 2) console.log('ready');
    } else {
      throw err;
    }
  });
}
