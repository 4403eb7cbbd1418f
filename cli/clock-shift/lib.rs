//! A fault for `rct chaos`: loaded into one process with `LD_PRELOAD`, it shifts that
//! process's wall clock by `RCT_CLOCK_SHIFT_MS` milliseconds (ahead when positive, behind
//! when negative). It answers `clock_gettime` for the realtime clocks, the call every wall
//! clock reading of a Rust program on Linux ends in; monotonic clocks (timers, timeouts) are
//! left alone, as a machine whose clock is set wrong has them.
//!
//! Built by `cli/build.rs` as a standalone library (no dependencies, outside the workspace's
//! crates) and embedded in `rct`; rct itself never loads it. The processes an agent starts
//! (scripts) inherit it, as they would a machine's wrong clock.

use std::ffi::{c_char, c_int, c_long, c_void};
use std::sync::OnceLock;

/// `struct timespec` of the C library (`time_t` and the nanoseconds are `long` on Linux's
/// default ABIs).
#[repr(C)]
pub struct Timespec {
    tv_sec: c_long,
    tv_nsec: c_long,
}

type ClockGettime = unsafe extern "C" fn(c_int, *mut Timespec) -> c_int;

/// The clocks that tell the time of day (`linux/time.h`); the others count from boot.
const WALL_CLOCKS: [c_int; 4] = [
    0,  // CLOCK_REALTIME
    5,  // CLOCK_REALTIME_COARSE
    8,  // CLOCK_REALTIME_ALARM
    11, // CLOCK_TAI
];
/// glibc's `RTLD_NEXT`: the next object in search order, here the C library.
const RTLD_NEXT: *mut c_void = -1isize as *mut c_void;
const NANOS: i128 = 1_000_000_000;

unsafe extern "C" {
    fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
}

fn shift_nanos() -> i128 {
    static SHIFT: OnceLock<i128> = OnceLock::new();
    *SHIFT.get_or_init(|| {
        std::env::var("RCT_CLOCK_SHIFT_MS")
            .ok()
            .and_then(|v| v.trim().parse::<i64>().ok())
            .map_or(0, |ms| i128::from(ms) * 1_000_000)
    })
}

fn real() -> ClockGettime {
    static REAL: OnceLock<usize> = OnceLock::new();
    let address = *REAL.get_or_init(|| {
        // SAFETY: dlsym with a NUL-terminated name; the C library defines clock_gettime.
        unsafe { dlsym(RTLD_NEXT, c"clock_gettime".as_ptr()) as usize }
    });
    assert!(address != 0, "clock_gettime not found behind the shift");
    // SAFETY: the address is the C library's clock_gettime, of exactly this signature.
    unsafe { std::mem::transmute::<usize, ClockGettime>(address) }
}

/// `clock_gettime(2)`, realtime clocks shifted.
///
/// # Safety
/// As `clock_gettime(2)`: `ts` points to writable memory for one `timespec`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn clock_gettime(clock: c_int, ts: *mut Timespec) -> c_int {
    // SAFETY: the caller's contract is the C library's.
    let result = unsafe { real()(clock, ts) };
    if result == 0 && !ts.is_null() && WALL_CLOCKS.contains(&clock) {
        // SAFETY: the call succeeded, so `ts` holds a time.
        let ts = unsafe { &mut *ts };
        let shifted = i128::from(ts.tv_sec) * NANOS + i128::from(ts.tv_nsec) + shift_nanos();
        ts.tv_sec = shifted.div_euclid(NANOS) as c_long;
        ts.tv_nsec = shifted.rem_euclid(NANOS) as c_long;
    }
    result
}
