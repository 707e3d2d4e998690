//! The MMDS document: a JSON value with a size limit, set by PUT, merged by PATCH.
//!
//! TEMPORARY SHIM (helper mC): the API helper mA provides, just enough for the front
//! door to build against until mA's store is merged; replaced by mA's file then.

use serde_json::Value;

/// Why a document was refused.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("The MMDS patch request doesn't fit.")]
    LimitExceeded,
    #[error("The MMDS data store is not initialized.")]
    NotInitialized,
}

/// The document and its size limit.
#[derive(Debug)]
pub struct Store {
    value: Value,
    limit: usize,
    initialized: bool,
}

impl Default for Store {
    fn default() -> Self {
        Store::new(51200)
    }
}

impl Store {
    pub fn new(limit: usize) -> Store {
        Store {
            value: Value::Null,
            limit,
            initialized: false,
        }
    }

    pub fn set_limit(&mut self, limit: usize) {
        self.limit = limit;
    }

    fn fits(&self, v: &Value) -> bool {
        serde_json::to_vec(v).is_ok_and(|b| b.len() <= self.limit)
    }

    pub fn put(&mut self, v: Value) -> Result<(), Error> {
        if !self.fits(&v) {
            return Err(Error::LimitExceeded);
        }
        self.value = v;
        self.initialized = true;
        Ok(())
    }

    pub fn patch(&mut self, p: Value) -> Result<(), Error> {
        if !self.initialized {
            return Err(Error::NotInitialized);
        }
        let mut v = self.value.clone();
        merge(&mut v, p);
        if !self.fits(&v) {
            return Err(Error::LimitExceeded);
        }
        self.value = v;
        Ok(())
    }

    pub fn get(&self) -> &Value {
        &self.value
    }
}

fn merge(target: &mut Value, patch: Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Default::default());
            }
            if let Value::Object(t) = target {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(&k);
                    } else {
                        merge(t.entry(k).or_insert(Value::Null), v);
                    }
                }
            }
        }
        other => *target = other,
    }
}
