//! One task at a time per key, within this process: a table of async mutexes that keeps
//! an entry only while some task holds or waits for it.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};

/// Per-key async mutual exclusion (aggregate writers, cache loaders). Entries are removed
/// as soon as no task holds or waits for their key, so the table stays as small as the
/// set of keys in use.
pub struct KeyedLocks<K> {
    table: Mutex<HashMap<K, Arc<tokio::sync::Mutex<()>>>>,
}

impl<K> Default for KeyedLocks<K> {
    fn default() -> Self {
        KeyedLocks {
            table: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Eq + Hash + Clone> KeyedLocks<K> {
    fn table(&self) -> MutexGuard<'_, HashMap<K, Arc<tokio::sync::Mutex<()>>>> {
        // Nothing panics while holding it; a poisoned table is still a valid table.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Run `work` while holding `key`'s lock; tasks with the same key queue in order.
    pub async fn run<T>(&self, key: &K, work: impl Future<Output = T>) -> T {
        let lock = self.table().entry(key.clone()).or_default().clone();
        let result = {
            let _held = lock.lock().await;
            work.await
        };
        let mut table = self.table();
        // The table's copy and ours: nobody else holds or waits for it.
        if table.get(key).is_some_and(|l| Arc::ptr_eq(l, &lock)) && Arc::strong_count(&lock) <= 2 {
            table.remove(key);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tasks_of_one_key_run_one_at_a_time_and_the_table_empties() {
        let locks = Arc::new(KeyedLocks::<u32>::default());
        let inside = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (locks, inside) = (locks.clone(), inside.clone());
            tasks.push(tokio::spawn(async move {
                locks
                    .run(&1, async {
                        let n = inside.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        tokio::task::yield_now().await;
                        inside.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                        n
                    })
                    .await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), 0, "two tasks held one key at once");
        }
        assert!(locks.table().is_empty());
    }
}
