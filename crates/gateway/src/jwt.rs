//! Bearer JWTs: verified against configured keys, each pinned to one algorithm (an HS256
//! secret, RS256 or ES256 public keys from PEM files or a JWKS file); `exp`, `iss`, `aud` and
//! `sub` are required. Every refusal is a 401 problem with `WWW-Authenticate: Bearer
//! error="invalid_token"` and a description that never says anything about the keys.

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_kit::{Caller, Problem, Role};
pub use jsonwebtoken::Algorithm;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// One key tokens may be signed with, and the only algorithm it verifies.
#[derive(Clone)]
pub struct VerifyKey {
    pub kid: Option<String>,
    pub alg: Algorithm,
    key: DecodingKey,
}

impl std::fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key material.
        f.debug_struct("VerifyKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

/// The asymmetric algorithms a public key may be pinned to.
pub fn public_algorithm(name: &str) -> Result<Algorithm, String> {
    match name.to_ascii_uppercase().as_str() {
        "RS256" => Ok(Algorithm::RS256),
        "ES256" => Ok(Algorithm::ES256),
        other => Err(format!(
            "unsupported key algorithm {other:?}: RS256 or ES256"
        )),
    }
}

impl VerifyKey {
    /// An HS256 shared secret (at least 32 bytes).
    pub fn hs256(secret: &[u8]) -> Result<Self, String> {
        if secret.len() < 32 {
            return Err("an HS256 secret needs at least 32 bytes".into());
        }
        Ok(Self {
            kid: None,
            alg: Algorithm::HS256,
            key: DecodingKey::from_secret(secret),
        })
    }

    /// An RS256 or ES256 public key in PEM.
    pub fn public_pem(alg: Algorithm, pem: &[u8]) -> Result<Self, String> {
        let key = match alg {
            Algorithm::RS256 => DecodingKey::from_rsa_pem(pem),
            Algorithm::ES256 => DecodingKey::from_ec_pem(pem),
            other => return Err(format!("{other:?} is not a public-key algorithm here")),
        }
        .map_err(|e| format!("not a {alg:?} public key in PEM: {e}"))?;
        Ok(Self {
            kid: None,
            alg,
            key,
        })
    }

    /// Every key of a JWKS document. Each key must name its algorithm (`alg`: RS256 or
    /// ES256); its `kid`, if any, must match the token's.
    pub fn jwks(json: &str) -> Result<Vec<Self>, String> {
        let set: jsonwebtoken::jwk::JwkSet =
            serde_json::from_str(json).map_err(|e| format!("not a JWKS document: {e}"))?;
        set.keys
            .iter()
            .map(|jwk| {
                let alg = jwk
                    .common
                    .key_algorithm
                    .ok_or("every JWKS key must name its alg")?
                    .to_string();
                let alg = public_algorithm(&alg)?;
                let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("a JWKS key: {e}"))?;
                Ok(Self {
                    kid: jwk.common.key_id.clone(),
                    alg,
                    key,
                })
            })
            .collect()
    }
}

/// What orderwave puts in (and requires of) a token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub role: String,
    pub iss: String,
    pub aud: String,
    pub exp: u64,
    pub iat: u64,
}

/// Why a request was not authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    /// No bearer token.
    Missing,
    /// Not a JWT (or not a bearer header).
    Malformed,
    Expired,
    /// Issued for another issuer or audience.
    NotForUs,
    /// Anything else: unknown key or algorithm, bad signature, missing claims, unknown role.
    Invalid,
}

impl AuthError {
    /// The metric label.
    pub fn reason(self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Malformed => "malformed",
            AuthError::Expired => "expired",
            AuthError::NotForUs => "issuer_or_audience",
            AuthError::Invalid => "invalid",
        }
    }

    fn description(self) -> &'static str {
        match self {
            AuthError::Missing => "Send an Authorization: Bearer <token> header.",
            AuthError::Malformed => "The bearer token is malformed.",
            AuthError::Expired => "The token has expired.",
            AuthError::NotForUs => "The token was not issued for this API.",
            AuthError::Invalid => "The token is not valid.",
        }
    }
}

impl IntoResponse for AuthError {
    fn into_response(self) -> Response {
        let challenge = match self {
            // RFC 6750 §3.1: no error code when the request had no credentials.
            AuthError::Missing => r#"Bearer realm="orderwave""#.to_string(),
            other => format!(
                r#"Bearer realm="orderwave", error="invalid_token", error_description="{}""#,
                other.description()
            ),
        };
        let mut response = Problem::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Authentication required",
        )
        .detail(self.description())
        .into_response();
        if let Ok(value) = HeaderValue::from_str(&challenge) {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, value);
        }
        response
    }
}

/// Checks bearer tokens.
#[derive(Debug, Clone)]
pub struct Verifier {
    keys: Vec<VerifyKey>,
    issuer: String,
    audience: String,
    leeway: Duration,
}

impl Verifier {
    pub fn new(keys: Vec<VerifyKey>, issuer: &str, audience: &str, leeway: Duration) -> Self {
        Self {
            keys,
            issuer: issuer.to_string(),
            audience: audience.to_string(),
            leeway,
        }
    }

    /// The caller of a request with these headers: its `Authorization: Bearer` token or, for a
    /// WebSocket upgrade from a browser (which cannot set that header), the token offered as
    /// the second subprotocol after [`http_kit::auth::WEBSOCKET_BEARER`].
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, AuthError> {
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return match http_kit::auth::websocket_bearer(headers) {
                Some(token) => self.verify(token),
                None => Err(AuthError::Missing),
            };
        };
        let value = value.to_str().map_err(|_| AuthError::Malformed)?;
        let (scheme, token) = value.split_once(' ').ok_or(AuthError::Malformed)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(AuthError::Malformed);
        }
        self.verify(token.trim())
    }

    /// The caller a token names, if it is valid.
    pub fn verify(&self, token: &str) -> Result<Caller, AuthError> {
        // `alg: none` and unknown algorithms fail here: the header does not parse.
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
        // The token's algorithm only selects among keys pinned to it: a key never verifies
        // with another algorithm (no HS256 token checked against an RSA public key).
        let mut error = AuthError::Invalid;
        for key in self.keys.iter().filter(|k| {
            k.alg == header.alg
                && match (&k.kid, &header.kid) {
                    (Some(a), Some(b)) => a == b,
                    _ => true,
                }
        }) {
            let mut validation = Validation::new(key.alg);
            validation.set_issuer(&[&self.issuer]);
            validation.set_audience(&[&self.audience]);
            validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
            validation.leeway = self.leeway.as_secs();
            // A token not valid yet (`nbf` in the future) is refused too.
            validation.validate_nbf = true;
            match jsonwebtoken::decode::<serde_json::Value>(token, &key.key, &validation) {
                Ok(data) => return caller_of(&data.claims),
                Err(e) => {
                    error = match e.kind() {
                        ErrorKind::ExpiredSignature => AuthError::Expired,
                        ErrorKind::InvalidIssuer | ErrorKind::InvalidAudience => {
                            AuthError::NotForUs
                        }
                        ErrorKind::InvalidToken
                        | ErrorKind::Base64(_)
                        | ErrorKind::Json(_)
                        | ErrorKind::Utf8(_) => AuthError::Malformed,
                        _ => AuthError::Invalid,
                    };
                    // A bad signature may be another key's token (rotation): try the next.
                    if error != AuthError::Invalid {
                        return Err(error);
                    }
                }
            }
        }
        Err(error)
    }
}

fn caller_of(claims: &serde_json::Value) -> Result<Caller, AuthError> {
    let subject = claims["sub"]
        .as_str()
        .filter(|s| !s.is_empty() && s.len() <= 200)
        .ok_or(AuthError::Invalid)?;
    let role: Role = claims["role"]
        .as_str()
        .ok_or(AuthError::Invalid)?
        .parse()
        .map_err(|_| AuthError::Invalid)?;
    Ok(Caller::new(subject, role))
}

/// Mints tokens (the embedded default, `orderwave token`, and service tokens).
#[derive(Clone)]
pub struct Signer {
    alg: Algorithm,
    key: EncodingKey,
    kid: Option<String>,
    issuer: String,
    audience: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("alg", &self.alg)
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
    }
}

impl Signer {
    pub fn hs256(secret: &[u8], issuer: &str, audience: &str) -> Self {
        Self {
            alg: Algorithm::HS256,
            key: EncodingKey::from_secret(secret),
            kid: None,
            issuer: issuer.to_string(),
            audience: audience.to_string(),
        }
    }

    /// An RS256 or ES256 private key in PEM (PKCS#8 for ES256).
    pub fn private_pem(
        alg: Algorithm,
        pem: &[u8],
        kid: Option<String>,
        issuer: &str,
        audience: &str,
    ) -> Result<Self, String> {
        let key = match alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(pem),
            Algorithm::ES256 => EncodingKey::from_ec_pem(pem),
            other => return Err(format!("{other:?} is not a public-key algorithm here")),
        }
        .map_err(|e| format!("not a {alg:?} private key in PEM: {e}"))?;
        Ok(Self {
            alg,
            key,
            kid,
            issuer: issuer.to_string(),
            audience: audience.to_string(),
        })
    }

    /// A token for `subject` in `role`, valid for `ttl`.
    pub fn mint(&self, subject: &str, role: Role, ttl: Duration) -> Result<String, String> {
        let now = jsonwebtoken::get_current_timestamp();
        let claims = Claims {
            sub: subject.to_string(),
            role: role.as_str().to_string(),
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            iat: now,
            exp: now + ttl.as_secs(),
        };
        let mut header = Header::new(self.alg);
        header.kid = self.kid.clone();
        jsonwebtoken::encode(&header, &claims, &self.key).map_err(|e| e.to_string())
    }
}

/// A fresh random HS256 secret (64 hex characters).
pub fn random_secret() -> String {
    use rand::Rng;
    let bytes: [u8; 32] = rand::rng().random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
