//! Password hashing with Argon2id, off the async runtime.

use std::sync::{Arc, OnceLock};

use anyhow::Context;
use argon2::password_hash::{PasswordHasher as _, PasswordVerifier as _};
use argon2::{Algorithm, Argon2, Params, Version};
use domain::{Password, PasswordHash};

use crate::error::StoreError;

/// Argon2id cost parameters. The default is OWASP's recommendation for Argon2id
/// (19 MiB of memory, 2 passes, 1 lane).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashingParams {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

impl Default for HashingParams {
    fn default() -> Self {
        HashingParams {
            memory_kib: 19 * 1024,
            iterations: 2,
            parallelism: 1,
        }
    }
}

/// Hashes and verifies passwords. Verification of an unknown account runs against a dummy
/// hash of the same cost, so a wrong email and a wrong password take the same time.
#[derive(Clone)]
pub struct PasswordHasher {
    params: HashingParams,
    dummy: Arc<OnceLock<String>>,
}

impl PasswordHasher {
    pub fn new(params: HashingParams) -> Result<Self, StoreError> {
        // Fail early on impossible parameters.
        Params::new(
            params.memory_kib,
            params.iterations,
            params.parallelism,
            None,
        )
        .map_err(|e| StoreError::msg(format!("invalid Argon2 parameters: {e}")))?;
        Ok(PasswordHasher {
            params,
            dummy: Arc::new(OnceLock::new()),
        })
    }

    pub fn params(&self) -> HashingParams {
        self.params
    }

    fn argon2(params: HashingParams) -> Result<Argon2<'static>, StoreError> {
        let p = Params::new(
            params.memory_kib,
            params.iterations,
            params.parallelism,
            None,
        )
        .map_err(|e| StoreError::msg(format!("invalid Argon2 parameters: {e}")))?;
        Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, p))
    }

    fn hash_blocking(params: HashingParams, password: &str) -> Result<String, StoreError> {
        // A fresh random salt per hash (from the OS generator).
        let hash = Self::argon2(params)?
            .hash_password(password.as_bytes())
            .map_err(|e| StoreError::msg(format!("hashing a password: {e}")))?;
        Ok(hash.to_string())
    }

    /// Hash a new password (CPU-bound; runs on the blocking pool).
    pub async fn hash(&self, password: &Password) -> Result<PasswordHash, StoreError> {
        let params = self.params;
        let pw = password.expose().to_owned();
        let phc = tokio::task::spawn_blocking(move || Self::hash_blocking(params, &pw))
            .await
            .context("password hashing task")??;
        Ok(PasswordHash::from_phc(phc))
    }

    /// Does `password` match `hash`? `None` verifies against the dummy hash and returns false.
    pub async fn verify(
        &self,
        password: &str,
        hash: Option<&PasswordHash>,
    ) -> Result<bool, StoreError> {
        let params = self.params;
        let (phc, real) = match hash {
            Some(h) => (h.as_str().to_owned(), true),
            None => (self.dummy_hash()?, false),
        };
        let pw = password.to_owned();
        let ok = tokio::task::spawn_blocking(move || -> Result<bool, StoreError> {
            // Verified with the parameters recorded in the hash itself.
            Ok(Self::argon2(params)?
                .verify_password(pw.as_bytes(), phc.as_str())
                .is_ok())
        })
        .await
        .context("password verification task")??;
        Ok(ok && real)
    }

    fn dummy_hash(&self) -> Result<String, StoreError> {
        if let Some(h) = self.dummy.get() {
            return Ok(h.clone());
        }
        let h = Self::hash_blocking(self.params, "karmic-timing-equaliser")?;
        Ok(self.dummy.get_or_init(|| h).clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cheap() -> PasswordHasher {
        PasswordHasher::new(HashingParams {
            memory_kib: 256,
            iterations: 1,
            parallelism: 1,
        })
        .unwrap()
    }

    #[tokio::test]
    async fn a_hash_verifies_only_its_own_password() {
        let h = cheap();
        let pw = Password::parse("correct horse battery").unwrap();
        let hash = h.hash(&pw).await.unwrap();
        assert!(hash.as_str().starts_with("$argon2id$"));
        assert!(
            h.verify("correct horse battery", Some(&hash))
                .await
                .unwrap()
        );
        assert!(!h.verify("wrong horse battery", Some(&hash)).await.unwrap());
    }

    #[tokio::test]
    async fn verifying_without_a_hash_is_always_false() {
        let h = cheap();
        assert!(!h.verify("karmic-timing-equaliser", None).await.unwrap());
    }

    #[tokio::test]
    async fn two_hashes_of_one_password_differ_by_salt() {
        let h = cheap();
        let pw = Password::parse("correct horse battery").unwrap();
        assert_ne!(h.hash(&pw).await.unwrap(), h.hash(&pw).await.unwrap());
    }
}
