//! NATS decentralised authentication for tests, made here instead of with `nsc`: operator,
//! account and user NKeys (the nkeys crate), the JWTs that bind them (nats-io/jwt v2 claims,
//! signed with the issuer's key) and the user's `.creds` file, plus a nats-server config for
//! operator mode with those accounts preloaded (`resolver: MEMORY`).

use std::time::{SystemTime, UNIX_EPOCH};

use data_encoding::{BASE32_NOPAD, BASE64URL_NOPAD};
use nkeys::KeyPair;
use serde_json::{json, Value};
use sha2::{Digest, Sha512_256};

/// Seconds since the epoch.
pub fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// A signed NATS JWT: `base64url(header).base64url(claims).base64url(signature)`, the signature
/// by `issuer` over the first two parts. `nats` is the type-specific part (`"type"` and
/// `"version": 2` are added); `expires` is a Unix time (`exp`), if any.
pub fn encode(issuer: &KeyPair, subject: &str, name: &str, mut nats: Value, expires: Option<i64>) -> String {
    let kind = match subject.as_bytes().first() {
        Some(b'O') => "operator",
        Some(b'A') => "account",
        Some(b'U') => "user",
        _ => panic!("not an operator, account or user public key: {subject}"),
    };
    nats["type"] = json!(kind);
    nats["version"] = json!(2);
    let mut claims = json!({
        "iat": now(),
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
    });
    if let Some(exp) = expires {
        claims["exp"] = json!(exp);
    }
    // The id, as nats-io/jwt makes it: base32 of the SHA-512/256 of the standard claims without
    // it (nats-server only needs it to be unique; it does not recompute it).
    claims["jti"] = json!(BASE32_NOPAD.encode(&Sha512_256::digest(claims.to_string().as_bytes())));
    claims["nats"] = nats;
    let header = BASE64URL_NOPAD.encode(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let body = BASE64URL_NOPAD.encode(claims.to_string().as_bytes());
    let signed = format!("{header}.{body}");
    let signature = issuer.sign(signed.as_bytes()).expect("sign a JWT");
    format!("{signed}.{}", BASE64URL_NOPAD.encode(&signature))
}

/// No limit, in the limits of account and user claims (-1; a missing limit reads as 0, which
/// would allow no connections or subscriptions at all).
const NO_LIMIT: i64 = -1;

/// The claims of an account without limits; with JetStream (unlimited) when `jetstream`.
fn account_claims(jetstream: bool) -> Value {
    let mut limits = json!({
        "subs": NO_LIMIT, "data": NO_LIMIT, "payload": NO_LIMIT,
        "imports": NO_LIMIT, "exports": NO_LIMIT, "wildcards": true, "conn": NO_LIMIT, "leaf": NO_LIMIT,
    });
    if jetstream {
        for key in ["mem_storage", "disk_storage", "streams", "consumer"] {
            limits[key] = json!(NO_LIMIT);
        }
    }
    json!({ "limits": limits })
}

/// A user JWT for `user`, signed by `issuer` (normally its account). `permissions` is the JWT
/// form (`{"pub": {"allow": [...]}, "sub": {...}, "resp": {...}}`); None allows everything.
pub fn user_jwt(
    issuer: &KeyPair,
    user: &KeyPair,
    name: &str,
    permissions: Option<Value>,
    expires: Option<i64>,
) -> String {
    let mut nats = json!({ "subs": NO_LIMIT, "data": NO_LIMIT, "payload": NO_LIMIT });
    if let Some(Value::Object(permissions)) = permissions {
        for (key, value) in permissions {
            nats[key] = value;
        }
    }
    encode(issuer, &user.public_key(), name, nats, expires)
}

/// A `.creds` file as `nsc` and `nats` write it: the user JWT, then the user's seed.
pub fn creds(jwt: &str, user: &KeyPair) -> String {
    let seed = user.seed().expect("a user seed");
    format!(
        "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\
         NKEYs are sensitive and should be treated as secrets.\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n\
         *************************************************************\n"
    )
}

/// An operator with a system account and one account (JetStream enabled) for the services.
pub struct Operator {
    pub operator: KeyPair,
    pub system: KeyPair,
    pub account: KeyPair,
}

impl Operator {
    /// Fresh keys.
    pub fn new() -> Self {
        Operator { operator: KeyPair::new_operator(), system: KeyPair::new_account(), account: KeyPair::new_account() }
    }

    /// A nats-server config for operator mode trusting this operator, with both accounts
    /// preloaded into a memory resolver.
    pub fn server_config(&self) -> String {
        let system = self.system.public_key();
        let account = self.account.public_key();
        let operator_jwt = encode(
            &self.operator,
            &self.operator.public_key(),
            "chunkmill-test-operator",
            json!({ "system_account": system }),
            None,
        );
        let system_jwt = encode(&self.operator, &system, "SYS", account_claims(false), None);
        let account_jwt = encode(&self.operator, &account, "chunkmill", account_claims(true), None);
        format!(
            "operator: \"{operator_jwt}\"\nsystem_account: {system}\nresolver: MEMORY\n\
             resolver_preload: {{\n  {system}: \"{system_jwt}\"\n  {account}: \"{account_jwt}\"\n}}\n"
        )
    }

    /// A new user of the services' account: its `.creds` file's text.
    pub fn user_creds(&self, name: &str, permissions: Option<Value>) -> String {
        let user = KeyPair::new_user();
        creds(&user_jwt(&self.account, &user, name, permissions, None), &user)
    }
}

impl Default for Operator {
    fn default() -> Self {
        Self::new()
    }
}

/// The permissions of each role's user in deploy/nats/chunkmill-auth.conf (what the Helm values
/// give the NATS server), in the JWT's form: role name → `{"pub", "sub", "resp"}`.
pub fn role_permissions() -> Vec<(String, Value)> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/nats/chunkmill-auth.conf");
    let text = std::fs::read_to_string(&path).expect("deploy/nats/chunkmill-auth.conf");
    // JSON but for its comments and the `$VARIABLE` passwords.
    let json: String = text
        .lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .map(|line| match line.split_once("\"password\": $") {
            Some((indent, _)) => format!("{indent}\"password\": \"\","),
            None => line.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    let conf: Value = serde_json::from_str(&json).expect("chunkmill-auth.conf is JSON but for comments and $VARIABLES");
    let users = conf.pointer("/authorization/users").and_then(Value::as_array).expect("authorization.users");
    users
        .iter()
        .map(|user| {
            let name = user["user"].as_str().expect("a user name").to_string();
            let permissions = &user["permissions"];
            let mut jwt = json!({});
            for (from, to) in [("publish", "pub"), ("subscribe", "sub")] {
                if let Some(rule) = permissions.get(from) {
                    jwt[to] = rule.clone();
                }
            }
            if permissions["allow_responses"] == json!(true) {
                // As in a server config: one reply per request received (0 s = the default TTL).
                jwt["resp"] = json!({ "max": 1, "ttl": 0 });
            }
            (name, jwt)
        })
        .collect()
}
