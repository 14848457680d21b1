//! What a pending task costs a replica's heap beyond its payload, once the
//! state is read back from a snapshot's encoding (as a node restarting
//! holds it): bounded here, so that a change that makes every task or every
//! index entry larger fails a test, not only `phalanx bench restart`
//! (which measures the resident memory of a real node).
//!
//! Bytes are counted as requested of the allocator, by a counting global
//! allocator in front of the system's; this file holds one test so that
//! nothing else allocates meanwhile.

use phalanx_core::{Command, Limits, NewTask, Request, State, Task};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Heap bytes per pending root task beyond its payload, at most (about 230
/// now: the task and its map entry, and its entries in the ready queues
/// and the open trees).
const HEAP_PER_TASK_BEYOND_PAYLOAD_MAX: usize = 256;
const TASKS: usize = 20_000;
const PAYLOAD_BYTES: usize = 64;

struct Counting;

static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
        System.alloc(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// A state of `TASKS` pending roots as clients submit them through a node
/// (one queue, a trace context on each), encoded as a snapshot is.
fn snapshot() -> Vec<u8> {
    let limits = Limits { tasks_max: 2 * TASKS, queue_tasks_max: 2 * TASKS, ..Limits::default() };
    let mut state = State::new(limits);
    let payload = format!("\"{}\"", "x".repeat(PAYLOAD_BYTES - 2));
    for (batch, ids) in (0..TASKS).collect::<Vec<_>>().chunks(500).enumerate() {
        let tasks = ids
            .iter()
            .map(|n| NewTask {
                traceparent: Some(format!("00-{:032x}-{:016x}-01", n + 1, n + 1)),
                ..NewTask::new("restart", payload.clone())
            })
            .collect();
        let index = batch as u64 + 1;
        state.apply(index, &Request { now_ms: 1_000 + index, commands: vec![Command::Submit { tasks }] });
    }
    assert_eq!(state.task_count(), TASKS);
    rmp_serde::to_vec(&state).unwrap()
}

#[test]
fn a_pending_task_costs_a_bounded_heap_beyond_its_payload() {
    let bytes = snapshot();
    let before = LIVE_BYTES.load(Ordering::Relaxed);
    let mut state: State = rmp_serde::from_slice(&bytes).unwrap();
    state.restore();
    let after = LIVE_BYTES.load(Ordering::Relaxed);
    let per_task = (after - before) / TASKS - PAYLOAD_BYTES;
    println!("Task: {} bytes in place; heap per pending task beyond its payload: {per_task} bytes", size_of::<Task>());
    assert!(
        per_task <= HEAP_PER_TASK_BEYOND_PAYLOAD_MAX,
        "{per_task} heap bytes per task beyond its payload, over {HEAP_PER_TASK_BEYOND_PAYLOAD_MAX}"
    );
    assert_eq!(state.task_count(), TASKS);
}
