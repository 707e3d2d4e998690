//! The MMDS document: a JSON value with a size limit, set by PUT, merged by PATCH.
//!
//! Behaviour follows Firecracker v1.16.1 (checked against its binary on this host):
//! - any JSON value is accepted by PUT (an object, but also `5`, `"s"`, `[1]`, `null`);
//! - PATCH before a successful PUT is refused ([`Error::NotInitialized`]), even an
//!   empty patch;
//! - PATCH is a JSON merge patch (RFC 7396): a non-object patch replaces the document, an
//!   object patch merges key by key, `null` removes a key;
//! - the size of a document is the length of its compact serialization (serde_json's,
//!   UTF-8 bytes, no whitespace), and a document of exactly `limit` bytes fits; a PUT or
//!   PATCH whose result is larger is refused and leaves the document unchanged;
//! - `GET /mmds` shows `{}` while the document is `null` (before any PUT, or after
//!   `PUT null`); the guest, though, sees the `null` itself ([`Store::document`]).

use super::Error;
use serde_json::{Map, Value};
use std::io;
use std::sync::LazyLock;

/// The default size limit: Firecracker's API payload limit (its `--mmds-size-limit`
/// defaults to `--http-api-max-payload-size`, 51200).
pub const DEFAULT_SIZE_LIMIT: usize = 51200;

/// What `GET /mmds` shows for a `null` document.
static EMPTY_OBJECT: LazyLock<Value> = LazyLock::new(|| Value::Object(Map::new()));

/// The document and its size limit.
#[derive(Debug)]
pub struct Store {
    data: Value,
    /// Set by the first successful PUT; PATCH needs it.
    initialized: bool,
    limit: usize,
}

impl Default for Store {
    fn default() -> Self {
        Store::new(DEFAULT_SIZE_LIMIT)
    }
}

/// Counts the bytes written to it (the compact size of a document without building it).
struct Counter(usize);

impl io::Write for Counter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 = self.0.saturating_add(buf.len());
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The length of `value`'s compact JSON serialization, in bytes.
pub fn serialized_size(value: &Value) -> usize {
    let mut counter = Counter(0);
    // Serializing a `Value` cannot fail (its keys are strings) and `Counter` never fails
    // to write; were it to, the size so far is a lower bound, which the limit check would
    // treat leniently — but neither can happen.
    let _ = serde_json::to_writer(&mut counter, value);
    counter.0
}

/// Applies `patch` to `target` as an RFC 7396 JSON merge patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(changes) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(doc) = target {
        for (key, change) in changes {
            if change.is_null() {
                doc.remove(key);
            } else {
                merge_patch(doc.entry(key.as_str()).or_insert(Value::Null), change);
            }
        }
    }
}

impl Store {
    /// An empty (`null`, not yet initialized) store refusing documents over
    /// `limit_bytes`.
    pub fn new(limit_bytes: usize) -> Store {
        Store {
            data: Value::Null,
            initialized: false,
            limit: limit_bytes,
        }
    }

    /// Changes the size limit. The current document is kept even if it is now over it
    /// (as Firecracker); the limit applies to the next PUT or PATCH.
    pub fn set_limit(&mut self, limit_bytes: usize) {
        self.limit = limit_bytes;
    }

    /// The size limit in bytes.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Whether a PUT has succeeded (PATCH is refused before).
    pub fn is_initialized(&self) -> bool {
        self.initialized
    }

    fn check_size(&self, value: &Value) -> Result<(), Error> {
        let size = serialized_size(value);
        if size > self.limit {
            return Err(Error::LimitExceeded {
                size,
                limit: self.limit,
            });
        }
        Ok(())
    }

    /// Replaces the document (`PUT /mmds`, `--metadata`). Refused, leaving the store as
    /// it was, when `value` is over the limit.
    pub fn put(&mut self, value: Value) -> Result<(), Error> {
        self.check_size(&value)?;
        self.data = value;
        self.initialized = true;
        Ok(())
    }

    /// Merges `patch` into the document (`PATCH /mmds`, RFC 7396). Refused before any
    /// PUT, and when the result would be over the limit; a refused patch changes nothing.
    pub fn patch(&mut self, patch: Value) -> Result<(), Error> {
        if !self.initialized {
            return Err(Error::NotInitialized);
        }
        let mut merged = self.data.clone();
        merge_patch(&mut merged, &patch);
        self.check_size(&merged)?;
        self.data = merged;
        Ok(())
    }

    /// What `GET /mmds` returns: the document, or `{}` while it is `null`.
    pub fn get(&self) -> &Value {
        match self.data {
            Value::Null => &EMPTY_OBJECT,
            _ => &self.data,
        }
    }

    /// The document as stored (`null` before any PUT): what the guest reads.
    pub fn document(&self) -> &Value {
        &self.data
    }

    /// The subtree at `pointer`, a JSON pointer (RFC 6901: "" is the whole document,
    /// otherwise '/'-separated keys or array indexes, `~1` for '/', `~0` for '~'). One
    /// trailing '/' is ignored, so `/a/` is `/a` and `/` is the whole document.
    pub fn lookup(&self, pointer: &str) -> Option<&Value> {
        let pointer = pointer.strip_suffix('/').unwrap_or(pointer);
        self.data.pointer(pointer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doc_of_size(size: usize) -> Value {
        // {"k":"XXX..."} is 8 bytes plus the Xs.
        let v = json!({ "k": "X".repeat(size - 8) });
        assert_eq!(serialized_size(&v), size);
        v
    }

    #[test]
    fn get_before_any_put_is_empty_object_but_guest_sees_null() {
        let store = Store::default();
        assert_eq!(serde_json::to_string(store.get()).unwrap(), "{}");
        assert_eq!(store.document(), &Value::Null);
        assert!(!store.is_initialized());
    }

    #[test]
    fn default_limit_is_api_payload_limit() {
        assert_eq!(Store::default().limit(), 51200);
    }

    #[test]
    fn put_accepts_non_object_values() {
        let mut store = Store::default();
        for v in [json!(5), json!("s"), json!([1, 2]), json!(true)] {
            store.put(v.clone()).unwrap();
            assert_eq!(store.get(), &v);
        }
        store.put(Value::Null).unwrap();
        assert_eq!(serde_json::to_string(store.get()).unwrap(), "{}");
        // `PUT null` initializes the store: PATCH is allowed afterwards.
        store.patch(json!({"a": "b"})).unwrap();
        assert_eq!(store.get(), &json!({"a": "b"}));
    }

    #[test]
    fn patch_before_put_is_refused_with_firecrackers_message() {
        let mut store = Store::default();
        let err = store.patch(json!({"a": 1})).unwrap_err();
        assert!(matches!(err, Error::NotInitialized));
        assert_eq!(err.to_string(), "The MMDS data store is not initialized.");
        assert_eq!(store.document(), &Value::Null);
    }

    #[test]
    fn size_is_compact_serialization_and_exact_limit_fits() {
        let mut store = Store::new(20);
        // 24 bytes as written, 20 compact.
        let v: Value = serde_json::from_str(r#"{ "a" : "bbbbbbbbbbbb" }"#).unwrap();
        store.put(v).unwrap();
        assert_eq!(store.get().to_string(), r#"{"a":"bbbbbbbbbbbb"}"#);
        // Two-byte UTF-8 characters count as two bytes: 8 + 6 * 2 = 20 fits, 22 does not.
        store.put(json!({"a": "éééééé"})).unwrap();
        let err = store.put(json!({"a": "ééééééé"})).unwrap_err();
        assert!(matches!(
            err,
            Error::LimitExceeded {
                size: 22,
                limit: 20
            }
        ));
    }

    #[test]
    fn put_over_limit_is_refused_and_store_unchanged() {
        let mut store = Store::new(100);
        store.put(json!({"keep": "me"})).unwrap();
        let err = store.put(doc_of_size(101)).unwrap_err();
        assert_eq!(err.to_string(), "The MMDS patch request doesn't fit.");
        assert!(matches!(
            err,
            Error::LimitExceeded {
                size: 101,
                limit: 100
            }
        ));
        assert_eq!(store.get(), &json!({"keep": "me"}));
        store.put(doc_of_size(100)).unwrap();
    }

    #[test]
    fn put_over_limit_on_empty_store_leaves_it_uninitialized() {
        let mut store = Store::new(10);
        store.put(doc_of_size(11)).unwrap_err();
        assert!(!store.is_initialized());
        assert!(matches!(
            store.patch(json!({})).unwrap_err(),
            Error::NotInitialized
        ));
    }

    #[test]
    fn patch_over_limit_is_refused_and_store_unchanged() {
        let mut store = Store::new(30);
        store.put(json!({"a": "b"})).unwrap();
        let err = store.patch(json!({"c": "X".repeat(30)})).unwrap_err();
        assert_eq!(err.to_string(), "The MMDS patch request doesn't fit.");
        assert_eq!(store.get(), &json!({"a": "b"}));
        // A patch that shrinks the document back under the limit is accepted.
        store.set_limit(5);
        store.patch(json!({"a": null})).unwrap();
        assert_eq!(store.get(), &json!({}));
    }

    #[test]
    fn patch_merges_as_rfc7396() {
        let mut store = Store::default();
        store
            .put(json!({
                "name": {"first": "John", "second": "Doe"},
                "age": "43",
                "phones": {"home": {"RO": "+40", "UK": "+44"}, "mobile": "+44 2"}
            }))
            .unwrap();
        store
            .patch(json!({
                "name": {"second": null, "last": "Kennedy"},
                "age": "44",
                "phones": {"home": "+44 1", "mobile": {"RO": "+40 2"}},
                "new": {"deep": {"x": null, "y": 1}}
            }))
            .unwrap();
        assert_eq!(
            store.get(),
            &json!({
                "name": {"first": "John", "last": "Kennedy"},
                "age": "44",
                "phones": {"home": "+44 1", "mobile": {"RO": "+40 2"}},
                "new": {"deep": {"y": 1}}
            })
        );
        // A non-object patch replaces the whole document.
        store.patch(json!([1])).unwrap();
        assert_eq!(store.get(), &json!([1]));
        // An object patch onto a non-object starts from an empty object.
        store.patch(json!({"a": {"b": "c"}})).unwrap();
        assert_eq!(store.get(), &json!({"a": {"b": "c"}}));
    }

    #[test]
    fn lookup_follows_json_pointer_and_ignores_one_trailing_slash() {
        let mut store = Store::default();
        store
            .put(json!({"a": {"b/c": "slash", "m~n": "tilde", "list": ["x", "y"]}}))
            .unwrap();
        assert_eq!(store.lookup(""), Some(store.document()));
        assert_eq!(store.lookup("/"), Some(store.document()));
        assert_eq!(store.lookup("/a/b~1c"), Some(&json!("slash")));
        assert_eq!(store.lookup("/a/m~0n/"), Some(&json!("tilde")));
        assert_eq!(store.lookup("/a/list/1"), Some(&json!("y")));
        assert_eq!(store.lookup("/a/missing"), None);
        assert_eq!(store.lookup("a"), None);
    }
}
