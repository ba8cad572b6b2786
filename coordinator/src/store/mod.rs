//! Durable key-value storage behind a narrow trait: a sled adapter for the coordinator and an
//! in-memory adapter for unit tests, both held to one conformance suite ([`conformance`]).
//! Keys live in named trees; a [`Batch`] of writes, with optional preconditions, is atomic.

pub mod conformance;
mod memory;
mod sled_store;

pub use memory::MemoryStore;
pub use sled_store::SledStore;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A precondition of a batch did not hold; nothing was written.
    #[error("conflict on {tree}/{key}: the stored value changed")]
    Conflict {
        /// Tree of the failed precondition.
        tree: String,
        /// Key of the failed precondition (lossy UTF-8).
        key: String,
    },
    /// The underlying engine failed.
    #[error("storage engine: {0}")]
    Engine(String),
    /// A stored value could not be decoded.
    #[error("corrupt record {tree}/{key}: {reason}")]
    Corrupt {
        /// Tree of the record.
        tree: String,
        /// Key of the record.
        key: String,
        /// What is wrong.
        reason: String,
    },
}

/// One operation of a [`Batch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Write `value` at `tree/key`.
    Put {
        /// Tree.
        tree: String,
        /// Key.
        key: Vec<u8>,
        /// Value.
        value: Vec<u8>,
    },
    /// Remove `tree/key`.
    Delete {
        /// Tree.
        tree: String,
        /// Key.
        key: Vec<u8>,
    },
    /// Precondition: `tree/key` holds `value` (None: is absent).
    Expect {
        /// Tree.
        tree: String,
        /// Key.
        key: Vec<u8>,
        /// Expected value.
        value: Option<Vec<u8>>,
    },
}

/// Writes applied together or not at all; every `Expect` is checked first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    /// The operations, in order.
    pub ops: Vec<Op>,
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a write.
    pub fn put(mut self, tree: &str, key: impl AsRef<[u8]>, value: impl Into<Vec<u8>>) -> Self {
        self.ops.push(Op::Put {
            tree: tree.to_string(),
            key: key.as_ref().to_vec(),
            value: value.into(),
        });
        self
    }

    /// Adds a removal.
    pub fn delete(mut self, tree: &str, key: impl AsRef<[u8]>) -> Self {
        self.ops.push(Op::Delete {
            tree: tree.to_string(),
            key: key.as_ref().to_vec(),
        });
        self
    }

    /// Adds a precondition.
    pub fn expect(mut self, tree: &str, key: impl AsRef<[u8]>, value: Option<Vec<u8>>) -> Self {
        self.ops.push(Op::Expect {
            tree: tree.to_string(),
            key: key.as_ref().to_vec(),
            value,
        });
        self
    }
}

/// One stored entry: key and value.
pub type Entry = (Vec<u8>, Vec<u8>);

/// A durable map of trees of byte keys to byte values.
pub trait Store: Send + Sync + 'static {
    /// The value at `tree/key`.
    fn get(&self, tree: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Every entry of `tree` whose key starts with `prefix`, in key order.
    fn scan(&self, tree: &str, prefix: &[u8]) -> Result<Vec<Entry>, StoreError>;
    /// Applies `batch` atomically.
    fn apply(&self, batch: Batch) -> Result<(), StoreError>;
    /// Makes every applied batch durable.
    fn flush(&self) -> Result<(), StoreError>;
}

/// The single-tree key of `tree/key` (trees are namespaces inside one keyspace, so a batch
/// spanning trees is one transaction).
pub(crate) fn full_key(tree: &str, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(tree.len() + 1 + key.len());
    k.extend_from_slice(tree.as_bytes());
    k.push(0);
    k.extend_from_slice(key);
    k
}

pub(crate) fn conflict(tree: &str, key: &[u8]) -> StoreError {
    StoreError::Conflict {
        tree: tree.to_string(),
        key: String::from_utf8_lossy(key).into_owned(),
    }
}
