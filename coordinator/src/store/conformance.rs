//! The behaviour every [`Store`] adapter must show; each adapter's tests call [`run_all`].

use super::{Batch, Store, StoreError};

/// Runs every conformance check against `store` (which must start empty); panics on failure.
pub fn run_all(store: &dyn Store) {
    get_put_delete(store);
    trees_are_separate(store);
    scan_is_ordered_and_prefixed(store);
    batches_are_atomic(store);
    expectations_guard_writes(store);
}

fn get_put_delete(store: &dyn Store) {
    assert_eq!(store.get("a", b"k").unwrap(), None);
    store
        .apply(Batch::new().put("a", "k", b"1".to_vec()))
        .unwrap();
    assert_eq!(store.get("a", b"k").unwrap(), Some(b"1".to_vec()));
    store
        .apply(Batch::new().put("a", "k", b"2".to_vec()))
        .unwrap();
    assert_eq!(store.get("a", b"k").unwrap(), Some(b"2".to_vec()));
    store.apply(Batch::new().delete("a", "k")).unwrap();
    assert_eq!(store.get("a", b"k").unwrap(), None);
    store
        .apply(Batch::new().delete("a", "never-there"))
        .unwrap();
}

fn trees_are_separate(store: &dyn Store) {
    store
        .apply(
            Batch::new()
                .put("t1", "k", b"one".to_vec())
                .put("t2", "k", b"two".to_vec()),
        )
        .unwrap();
    assert_eq!(store.get("t1", b"k").unwrap(), Some(b"one".to_vec()));
    assert_eq!(store.get("t2", b"k").unwrap(), Some(b"two".to_vec()));
    // A tree whose name is a prefix of another's does not see its keys.
    store
        .apply(Batch::new().put("t", "x", b"t".to_vec()))
        .unwrap();
    let keys: Vec<Vec<u8>> = store
        .scan("t", b"")
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(keys, vec![b"x".to_vec()]);
}

fn scan_is_ordered_and_prefixed(store: &dyn Store) {
    let batch = ["b/2", "b/1", "b/10", "c/1", "a/9"]
        .iter()
        .fold(Batch::new(), |b, k| b.put("scan", k, k.as_bytes().to_vec()));
    store.apply(batch).unwrap();
    let keys: Vec<String> = store
        .scan("scan", b"b/")
        .unwrap()
        .into_iter()
        .map(|(k, v)| {
            assert_eq!(k, v);
            String::from_utf8(k).unwrap()
        })
        .collect();
    assert_eq!(keys, vec!["b/1", "b/10", "b/2"]);
    assert_eq!(store.scan("scan", b"").unwrap().len(), 5);
    assert!(store.scan("scan", b"z").unwrap().is_empty());
}

fn batches_are_atomic(store: &dyn Store) {
    store
        .apply(Batch::new().put("atom", "x", b"0".to_vec()))
        .unwrap();
    let failing = Batch::new()
        .put("atom", "y", b"1".to_vec())
        .delete("atom", "x")
        .expect("atom", "z", Some(b"missing".to_vec()));
    let err = store.apply(failing).unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
    assert_eq!(store.get("atom", b"x").unwrap(), Some(b"0".to_vec()));
    assert_eq!(store.get("atom", b"y").unwrap(), None);
    store.flush().unwrap();
}

fn expectations_guard_writes(store: &dyn Store) {
    // Consuming a one-time token: only the first of two identical batches succeeds.
    store
        .apply(Batch::new().put("tok", "id", b"unused".to_vec()))
        .unwrap();
    let consume = || {
        Batch::new()
            .expect("tok", "id", Some(b"unused".to_vec()))
            .put("tok", "id", b"used".to_vec())
    };
    store.apply(consume()).unwrap();
    assert!(matches!(
        store.apply(consume()),
        Err(StoreError::Conflict { .. })
    ));
    // Creating only if absent.
    let create = || {
        Batch::new()
            .expect("uniq", "name", None)
            .put("uniq", "name", b"1".to_vec())
    };
    store.apply(create()).unwrap();
    assert!(store.apply(create()).is_err());
}
