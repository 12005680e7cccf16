//! One policy for poisoned locks, used by every `std::sync::Mutex` of ours: a lock is poisoned
//! only when a thread panicked while holding it, which is a bug in our code (no lock of ours is
//! held across a user's transform; panics there are caught outside any lock). Skipping the
//! update, or carrying on with whatever the panicking thread left, would hide that bug behind a
//! quiet wrong state; so taking a poisoned lock panics too, naming the lock.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// Takes `mutex`, named `name` in the panic should it be poisoned.
pub fn lock<'a, T: ?Sized>(mutex: &'a Mutex<T>, name: &str) -> MutexGuard<'a, T> {
    mutex.lock().unwrap_or_else(|_| poisoned(name))
}

/// [`Condvar::wait_timeout`] under the same policy: the guard back, and whether it timed out.
pub fn wait_timeout<'a, T>(
    condvar: &Condvar,
    guard: MutexGuard<'a, T>,
    timeout: Duration,
    name: &str,
) -> (MutexGuard<'a, T>, bool) {
    let (guard, result) = condvar.wait_timeout(guard, timeout).unwrap_or_else(|_| poisoned(name));
    (guard, result.timed_out())
}

fn poisoned(name: &str) -> ! {
    panic!(
        "the {name} lock is poisoned: a thread panicked while holding it, a bug; see the panic logged before this one"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_healthy_lock_is_taken() {
        let mutex = Mutex::new(1);
        *lock(&mutex, "test") += 1;
        assert_eq!(*lock(&mutex, "test"), 2);
    }

    #[test]
    fn a_poisoned_lock_panics_naming_it_instead_of_being_skipped() {
        let mutex = Mutex::new(0);
        let _ = std::thread::scope(|s| {
            s.spawn(|| {
                let _guard = mutex.lock();
                panic!("a bug while holding the lock");
            })
            .join()
        });
        let taken = std::panic::catch_unwind(|| *lock(&mutex, "lease table"));
        let message = taken.expect_err("a poisoned lock must not be taken quietly");
        let message = message.downcast_ref::<String>().expect("panic! with a format gives a String");
        assert!(message.contains("the lease table lock is poisoned"), "{message}");
    }
}
