//! An in-memory [`Store`] for unit tests.

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::{Batch, Entry, Op, Store, StoreError, conflict, full_key};

/// A [`Store`] in a `BTreeMap`; nothing survives the process.
#[derive(Debug, Default)]
pub struct MemoryStore {
    map: Mutex<BTreeMap<Vec<u8>, Vec<u8>>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Vec<u8>, Vec<u8>>> {
        self.map
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Store for MemoryStore {
    fn get(&self, tree: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.lock().get(&full_key(tree, key)).cloned())
    }

    fn scan(&self, tree: &str, prefix: &[u8]) -> Result<Vec<Entry>, StoreError> {
        let start = full_key(tree, prefix);
        let skip = tree.len() + 1;
        Ok(self
            .lock()
            .range(start.clone()..)
            .take_while(|(k, _)| k.starts_with(&start))
            .map(|(k, v)| (k[skip..].to_vec(), v.clone()))
            .collect())
    }

    fn apply(&self, batch: Batch) -> Result<(), StoreError> {
        let mut map = self.lock();
        for op in &batch.ops {
            if let Op::Expect { tree, key, value } = op
                && map.get(&full_key(tree, key)) != value.as_ref()
            {
                return Err(conflict(tree, key));
            }
        }
        for op in batch.ops {
            match op {
                Op::Put { tree, key, value } => {
                    map.insert(full_key(&tree, &key), value);
                }
                Op::Delete { tree, key } => {
                    map.remove(&full_key(&tree, &key));
                }
                Op::Expect { .. } => {}
            }
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn conformance() {
        super::super::conformance::run_all(&super::MemoryStore::new());
    }
}
