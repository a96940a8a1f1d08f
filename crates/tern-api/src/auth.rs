//! Bearer-token authentication: HS256 JWTs carrying a tenant and permissions.

use crate::error::ApiError;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use tern_proto::TenantId;

/// What a token lets its holder do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Permission {
    /// Read the tenant's VMs.
    VmsRead,
    /// Create, configure and delete the tenant's VMs.
    VmsWrite,
    /// Act on every tenant's VMs.
    PlatformAdmin,
}

impl Permission {
    /// Name as written in tokens and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Permission::VmsRead => "vms:read",
            Permission::VmsWrite => "vms:write",
            Permission::PlatformAdmin => "platform:admin",
        }
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Permission {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "vms:read" => Ok(Permission::VmsRead),
            "vms:write" => Ok(Permission::VmsWrite),
            "platform:admin" => Ok(Permission::PlatformAdmin),
            other => Err(format!(
                "unknown permission `{other}` (known: vms:read, vms:write, platform:admin)"
            )),
        }
    }
}

/// The token's payload.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Claims {
    /// Subject: the tenant, for tools that only read `sub`.
    pub sub: String,
    /// The tenant the holder acts for.
    pub tenant: String,
    /// Permission names; unknown ones are ignored (newer tokens on older servers).
    pub permissions: Vec<String>,
    /// Issued at (seconds since the epoch).
    pub iat: u64,
    /// Expiry (seconds since the epoch).
    pub exp: u64,
}

/// The signing secret, ready to issue and verify tokens.
#[derive(Clone)]
pub struct AuthKeys {
    enc: EncodingKey,
    dec: DecodingKey,
    validation: Validation,
}

impl AuthKeys {
    /// Keys from the shared HS256 secret.
    pub fn from_secret(secret: &[u8]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = 5;
        Self {
            enc: EncodingKey::from_secret(secret),
            dec: DecodingKey::from_secret(secret),
            validation,
        }
    }

    /// Signs a token for `tenant` with `permissions`, valid for `ttl`.
    pub fn issue(
        &self,
        tenant: &TenantId,
        permissions: &[Permission],
        ttl: Duration,
    ) -> Result<String, jsonwebtoken::errors::Error> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let claims = Claims {
            sub: tenant.to_string(),
            tenant: tenant.to_string(),
            permissions: permissions.iter().map(|p| p.to_string()).collect(),
            iat: now,
            exp: now + ttl.as_secs(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.enc)
    }

    /// Verifies a token and returns who it speaks for.
    pub fn verify(&self, token: &str) -> Result<Caller, ApiError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.dec, &self.validation)
            .map_err(|e| ApiError::Unauthorized(format!("invalid token: {e}")))?;
        let tenant = TenantId::new(data.claims.tenant)
            .map_err(|e| ApiError::Unauthorized(format!("invalid token: {e}")))?;
        let permissions = data
            .claims
            .permissions
            .iter()
            .filter_map(|p| p.parse().ok())
            .collect();
        Ok(Caller {
            tenant,
            permissions,
        })
    }
}

/// The authenticated caller of a request.
#[derive(Clone, Debug)]
pub struct Caller {
    /// Tenant the caller acts for.
    pub tenant: TenantId,
    /// What the caller may do.
    pub permissions: BTreeSet<Permission>,
}

impl Caller {
    /// Whether the caller acts on every tenant.
    pub fn is_admin(&self) -> bool {
        self.permissions.contains(&Permission::PlatformAdmin)
    }

    /// Fails with 403 unless the caller holds `p` (admins hold everything).
    pub fn require(&self, p: Permission) -> Result<(), ApiError> {
        if self.is_admin() || self.permissions.contains(&p) {
            Ok(())
        } else {
            tracing::warn!(tenant = %self.tenant, permission = %p, "refused: the token lacks a permission");
            Err(ApiError::Forbidden(format!(
                "this token lacks the `{p}` permission"
            )))
        }
    }

    /// Whether the caller may see a VM of `tenant` (`None`: a warm pool VM).
    pub fn can_see(&self, tenant: Option<&TenantId>) -> bool {
        self.is_admin() || tenant == Some(&self.tenant)
    }
}

impl<S> FromRequestParts<S> for Caller
where
    S: Send + Sync,
    Arc<AuthKeys>: axum::extract::FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let caller = authenticate(parts, state);
        if let Err(e) = &caller {
            // The reason, never the token: a log is no place for credentials.
            let remote = parts
                .extensions
                .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
                .map(|c| c.0.to_string())
                .unwrap_or_default();
            tracing::warn!(
                method = %parts.method,
                path = parts.uri.path(),
                remote,
                reason = %e,
                "rejected login"
            );
        }
        caller
    }
}

fn authenticate<S>(parts: &Parts, state: &S) -> Result<Caller, ApiError>
where
    Arc<AuthKeys>: axum::extract::FromRef<S>,
{
    {
        let keys: Arc<AuthKeys> = axum::extract::FromRef::from_ref(state);
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or_else(|| ApiError::Unauthorized("missing Authorization: Bearer token".into()))?;
        let value = header
            .to_str()
            .map_err(|_| ApiError::Unauthorized("Authorization header is not text".into()))?;
        let token = value.strip_prefix("Bearer ").ok_or_else(|| {
            ApiError::Unauthorized("Authorization must be `Bearer <token>`".into())
        })?;
        keys.verify(token.trim())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue_and_verify() {
        let k = AuthKeys::from_secret(b"s3cret");
        let t = TenantId::new("acme").unwrap();
        let tok = k
            .issue(&t, &[Permission::VmsRead], Duration::from_secs(60))
            .unwrap();
        let c = k.verify(&tok).unwrap();
        assert_eq!(c.tenant, t);
        assert!(c.require(Permission::VmsRead).is_ok());
        assert!(c.require(Permission::VmsWrite).is_err());
        assert!(AuthKeys::from_secret(b"other").verify(&tok).is_err());
        assert!(k.verify("garbage").is_err());
    }

    #[test]
    fn expired_tokens_are_refused() {
        let k = AuthKeys::from_secret(b"s3cret");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let claims = Claims {
            sub: "a".into(),
            tenant: "a".into(),
            permissions: vec![],
            iat: now - 100,
            exp: now - 60,
        };
        let tok = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &k.enc).unwrap();
        let e = k.verify(&tok).unwrap_err();
        assert!(e.to_string().contains("xpired"), "{e}");
    }

    #[test]
    fn permissions_parse() {
        assert_eq!(
            "vms:write".parse::<Permission>().unwrap(),
            Permission::VmsWrite
        );
        assert!("vms:delete".parse::<Permission>().is_err());
    }
}
