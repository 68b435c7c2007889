//! In-process allocation hooks: a plain function as an [`AllocationHook`], panic containment, and the
//! blocking host's effect handlers (which wait for a hook's answer on the caller's thread).

use dps_core::effect::{
    AllocationCall, AllocationHook, Effect, EffectError, EffectHandlers, EffectResult, Effects,
};
use dps_core::object::BoxFuture;
use dps_core::proto::allocation::AllocationResponse;
use dps_core::{ErrorCode, Timestamp};
use futures_util::FutureExt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

/// A synchronous function as an allocation hook: `hook_fn(|call| Ok(AllocationResponse::hub("hub-2")))`.
/// Under a Tokio runtime it runs on the blocking pool (so a slow function, or one calling into Python or
/// Node, does not stall the runtime's threads); elsewhere on the caller's thread.
pub fn hook_fn<F>(f: F) -> Arc<dyn AllocationHook>
where
    F: Fn(&AllocationCall) -> Result<AllocationResponse, EffectError> + Send + Sync + 'static,
{
    Arc::new(FnHook(Arc::new(f)))
}

type HookFn = dyn Fn(&AllocationCall) -> Result<AllocationResponse, EffectError> + Send + Sync;

struct FnHook(Arc<HookFn>);

impl AllocationHook for FnHook {
    fn allocate(
        &self,
        call: AllocationCall,
        _now: Timestamp,
    ) -> BoxFuture<'static, Result<AllocationResponse, EffectError>> {
        let f = Arc::clone(&self.0);
        Box::pin(async move {
            if tokio::runtime::Handle::try_current().is_ok() {
                match tokio::task::spawn_blocking(move || f(&call)).await {
                    Ok(answer) => answer,
                    Err(_) => Err(panicked()),
                }
            } else {
                f(&call)
            }
        })
    }
}

fn panicked() -> EffectError {
    EffectError::with_code(ErrorCode::CustomAllocationFailed, "the allocation hook panicked")
}

/// Wraps a hook so that a panic (while it builds its future, or while the future runs) fails that one
/// registration with 400207 instead of unwinding through the host.
pub(crate) fn contained(hook: Arc<dyn AllocationHook>) -> Arc<dyn AllocationHook> {
    Arc::new(Contained(hook))
}

struct Contained(Arc<dyn AllocationHook>);

impl AllocationHook for Contained {
    fn allocate(
        &self,
        call: AllocationCall,
        now: Timestamp,
    ) -> BoxFuture<'static, Result<AllocationResponse, EffectError>> {
        match std::panic::catch_unwind(AssertUnwindSafe(|| self.0.allocate(call, now))) {
            Ok(answer) => Box::pin(
                AssertUnwindSafe(answer).catch_unwind().map(|r| r.unwrap_or_else(|_| Err(panicked()))),
            ),
            Err(_) => Box::pin(std::future::ready(Err(panicked()))),
        }
    }
}

/// The effect handlers of a [`BlockingHost`](crate::BlockingHost): those of [`EffectHandlers`], and an
/// allocation hook's answer awaited on the caller's thread.
#[derive(Debug, Clone, Default)]
pub struct BlockingEffects {
    /// The handlers.
    pub handlers: EffectHandlers,
}

impl Effects for BlockingEffects {
    fn perform(&self, effect: Effect, now: Timestamp) -> Result<EffectResult, EffectError> {
        match effect {
            Effect::Allocate(_) => block_on(self.handlers.perform_async(effect, now)),
            other => self.handlers.perform(other, now),
        }
    }

    fn perform_async(
        &self,
        effect: Effect,
        now: Timestamp,
    ) -> BoxFuture<'_, Result<EffectResult, EffectError>> {
        self.handlers.perform_async(effect, now)
    }
}

struct ThreadWaker(std::thread::Thread);

impl Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

/// Runs a future to completion on this thread (parking between polls).
fn block_on<F: Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    let waker = Waker::from(Arc::new(ThreadWaker(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    loop {
        if let Poll::Ready(out) = future.as_mut().poll(&mut cx) {
            return out;
        }
        std::thread::park();
    }
}
