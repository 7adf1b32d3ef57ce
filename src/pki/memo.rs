//! A bounded memo shared between threads.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::sync::Mutex;

/// A map shared by the agent's threads that forgets everything once it holds `capacity`
/// entries. It bounds memory for what the agent only remembers to save work or log lines
/// (which roots signed a certificate, which denials were logged), never for policy: losing an
/// entry only costs doing that work again.
pub(crate) struct ForgetfulMap<K, V> {
    entries: Mutex<HashMap<K, V>>,
    capacity: usize,
}

impl<K: Hash + Eq, V> ForgetfulMap<K, V> {
    pub(crate) fn new(capacity: usize) -> Self {
        ForgetfulMap {
            entries: Mutex::new(HashMap::new()),
            capacity,
        }
    }

    /// `f` of the value remembered for `key`, computed under the lock so nothing is copied.
    pub(crate) fn read<Q, R>(&self, key: &Q, f: impl FnOnce(&V) -> R) -> Option<R>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.lock().get(key).map(f)
    }

    /// Remembers `value` unless `key` is already known; true when it was not.
    pub(crate) fn insert(&self, key: K, value: V) -> bool {
        let mut entries = self.lock();
        if entries.contains_key(&key) {
            return false;
        }
        if entries.len() >= self.capacity {
            entries.clear();
        }
        entries.insert(key, value);
        true
    }

    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, V>> {
        // A poisoned lock only means another thread panicked; the map itself is still valid.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<K: Hash + Eq, V> Clone for ForgetfulMap<K, V> {
    /// A copy starts empty: what is remembered is never part of what is copied.
    fn clone(&self) -> Self {
        ForgetfulMap::new(self.capacity)
    }
}

impl<K: Hash + Eq, V> fmt::Debug for ForgetfulMap<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ForgetfulMap({} of {})", self.len(), self.capacity)
    }
}
