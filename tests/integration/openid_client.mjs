// Node's openid-client against the broker's OAuth facade, as a service would use it, unchanged.
// Run by tests/integration/test_facade_clients.py:
//   node openid_client.mjs ISSUER CLIENT_ID CLIENT_SECRET SCOPE
// prints one JSON line per client and auth method: {client, method, token_set | error}.
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const version = (alias) =>
  JSON.parse(readFileSync(new URL(`./node_modules/${alias}/package.json`, import.meta.url), "utf8")).version;
const [issuerUrl, clientId, clientSecret, scope] = process.argv.slice(2);
const results = [];

async function run(name, method, fn) {
  try {
    const tokenSet = await fn();
    results.push({ client: name, method, token_set: tokenSet });
  } catch (error) {
    results.push({ client: name, method, error: String(error && error.stack ? error.stack : error) });
  }
}

// openid-client 5: the seed's own sample, only the issuer URL and the credentials changed.
const v5 = require("oidc5");
for (const method of ["client_secret_basic", "client_secret_post"]) {
  await run(`openid-client ${version("oidc5")}`, method, async () => {
    const issuer = await v5.Issuer.discover(`${issuerUrl}/.well-known/openid-configuration`);
    const client = new issuer.Client({ client_id: clientId, client_secret: clientSecret, token_endpoint_auth_method: method });
    const tokenSet = await client.grant({ grant_type: "client_credentials", scope });
    return { access_token: tokenSet.access_token, token_type: tokenSet.token_type, expires_in: tokenSet.expires_in, scope: tokenSet.scope, issuer: issuer.issuer };
  });
}

// openid-client 6: discovery from the issuer itself, whose `issuer` it compares byte for byte.
const v6 = await import("oidc6");
for (const method of ["client_secret_basic", "client_secret_post"]) {
  await run(`openid-client ${version("oidc6")}`, method, async () => {
    const auth = method === "client_secret_basic" ? v6.ClientSecretBasic(clientSecret) : v6.ClientSecretPost(clientSecret);
    const config = await v6.discovery(new URL(issuerUrl), clientId, undefined, auth, { execute: [v6.allowInsecureRequests] });
    const tokens = await v6.clientCredentialsGrant(config, { scope });
    return { access_token: tokens.access_token, token_type: tokens.token_type, expires_in: tokens.expires_in, scope: tokens.scope, issuer: config.serverMetadata().issuer };
  });
}

console.log(JSON.stringify(results));
