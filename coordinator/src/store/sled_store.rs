//! The sled-backed [`Store`]: one sled tree, our trees as key prefixes, batches as sled
//! transactions.

use std::path::Path;

use sled::transaction::{ConflictableTransactionError, TransactionError};

use super::{Batch, Entry, Op, Store, StoreError, conflict, full_key};

/// A [`Store`] in a sled database on disk.
#[derive(Debug, Clone)]
pub struct SledStore {
    db: sled::Db,
}

impl SledStore {
    /// Opens (or creates) the database in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let db = sled::open(dir).map_err(|e| {
            // sled locks its folder; its error wraps the lock's in text only.
            if e.to_string().contains("could not acquire lock") {
                StoreError::Engine(format!(
                    "{} is in use by another running coordinator",
                    dir.display()
                ))
            } else {
                engine(e)
            }
        })?;
        Ok(Self { db })
    }
}

fn engine(e: impl std::fmt::Display) -> StoreError {
    StoreError::Engine(e.to_string())
}

impl Store for SledStore {
    fn get(&self, tree: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .db
            .get(full_key(tree, key))
            .map_err(engine)?
            .map(|v| v.to_vec()))
    }

    fn scan(&self, tree: &str, prefix: &[u8]) -> Result<Vec<Entry>, StoreError> {
        let skip = tree.len() + 1;
        self.db
            .scan_prefix(full_key(tree, prefix))
            .map(|item| {
                let (k, v) = item.map_err(engine)?;
                Ok((k[skip..].to_vec(), v.to_vec()))
            })
            .collect()
    }

    fn apply(&self, batch: Batch) -> Result<(), StoreError> {
        let result = self.db.transaction(|tx| {
            for op in &batch.ops {
                if let Op::Expect { tree, key, value } = op {
                    let current = tx.get(full_key(tree, key))?;
                    if current.as_deref() != value.as_deref() {
                        return Err(ConflictableTransactionError::Abort(conflict(tree, key)));
                    }
                }
            }
            for op in &batch.ops {
                match op {
                    Op::Put { tree, key, value } => {
                        tx.insert(full_key(tree, key), value.as_slice())?;
                    }
                    Op::Delete { tree, key } => {
                        tx.remove(full_key(tree, key))?;
                    }
                    Op::Expect { .. } => {}
                }
            }
            Ok(())
        });
        match result {
            Ok(()) => Ok(()),
            Err(TransactionError::Abort(e)) => Err(e),
            Err(TransactionError::Storage(e)) => Err(engine(e)),
        }
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map(|_| ()).map_err(engine)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conformance() {
        let dir = tempfile::tempdir().unwrap();
        super::super::conformance::run_all(&SledStore::open(dir.path()).unwrap());
    }

    #[test]
    fn survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SledStore::open(dir.path()).unwrap();
            store
                .apply(Batch::new().put("t", "k", b"v".to_vec()))
                .unwrap();
            store.flush().unwrap();
        }
        // sled's background threads release the database lock shortly after the drop.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let store = loop {
            match SledStore::open(dir.path()) {
                Ok(store) => break store,
                Err(e) if std::time::Instant::now() < deadline => {
                    assert!(e.to_string().contains("in use by another"), "{e}");
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(store.get("t", b"k").unwrap(), Some(b"v".to_vec()));
    }

    #[test]
    fn a_database_in_use_is_refused_with_a_clear_message() {
        let dir = tempfile::tempdir().unwrap();
        let _first = SledStore::open(dir.path()).unwrap();
        let second = SledStore::open(dir.path()).unwrap_err().to_string();
        assert!(
            second.contains(&format!(
                "{} is in use by another running coordinator",
                dir.path().display()
            )),
            "{second}"
        );
    }
}
