//! The sans-IO contract: a [`Flow`] is a value you feed [`Input`]s to and that answers with the next
//! [`Step`]; drivers ([`run_blocking`], [`run_async`]) perform the steps against a store and a hub
//! directory. Tests drive flows by hand, in virtual time.

use crate::effect::{Effect, EffectError, EffectResult, Effects, NoEffects};
use crate::hub::{AsyncHubDirectory, BlockingHubDirectory, HubError, HubOp, HubResult};
use crate::reply::Reply;
use crate::store::{AsyncStore, BlockingStore, StoreError, StoreOp, StoreResult};
use dps_proto::{DpsError, ErrorCode, Timestamp};

/// What a flow is given.
#[derive(Debug)]
// Results are moved once per step; boxing would add an allocation on the hot path for no gain.
#[allow(clippy::large_enum_variant)]
#[non_exhaustive]
pub enum Input {
    /// The first call.
    Start,
    /// The result of the last [`Step::Store`].
    Store(Result<StoreResult, StoreError>),
    /// The result of the last [`Step::Hub`].
    Hub(Result<HubResult, HubError>),
    /// The last [`Step::Respond`] was delivered (or queued) to the client.
    Responded,
    /// The result of the last [`Step::Effect`].
    Effect(Result<EffectResult, EffectError>),
}

/// What a flow wants next.
#[derive(Debug)]
#[non_exhaustive]
pub enum Step {
    /// Perform a storage operation and feed back [`Input::Store`].
    Store(StoreOp),
    /// Perform a hub operation and feed back [`Input::Hub`].
    Hub(HubOp),
    /// Perform an effect (e.g. issue a certificate) and feed back [`Input::Effect`].
    Effect(Effect),
    /// Send this reply to the client, then feed back [`Input::Responded`]. The flow may still have work
    /// to do afterwards (see `respond_before_assignment`).
    Respond(Reply),
    /// Nothing more to do.
    Finished,
}

/// A resumable piece of engine work.
pub trait Flow {
    /// Feeds an input and returns the next step. Call first with [`Input::Start`]; after
    /// [`Step::Finished`] further calls keep returning `Finished`.
    fn resume(&mut self, input: Input) -> Step;

    /// Feeds an input at time `now`: a driver with a clock (the host) passes the current time on every
    /// resume, so a flow can own its deadlines (webhook retries, challenge expiry) and stamps replies with
    /// the time they are made. [`Flow::resume`] keeps the time the flow last saw (its creation time at
    /// first), which is what pure drivers and virtual-time tests use. The engine's flows never go back in
    /// time: an earlier `now` is ignored.
    fn resume_at(&mut self, now: Timestamp, input: Input) -> Step {
        let _ = now;
        self.resume(input)
    }
}

impl<F: Flow + ?Sized> Flow for Box<F> {
    fn resume(&mut self, input: Input) -> Step {
        (**self).resume(input)
    }

    fn resume_at(&mut self, now: Timestamp, input: Input) -> Step {
        (**self).resume_at(now, input)
    }
}

fn missing_reply() -> Reply {
    Reply::error_plain(&DpsError::with_message(ErrorCode::InternalError, "the flow finished without a reply"))
}

/// Runs a flow to completion against a blocking store and hub directory; returns the (first) reply.
pub fn run_blocking<F: Flow + ?Sized>(
    flow: &mut F,
    store: &impl BlockingStore,
    hubs: &impl BlockingHubDirectory,
) -> Reply {
    let mut reply = None;
    let mut input = Input::Start;
    loop {
        input = match flow.resume(input) {
            Step::Store(op) => Input::Store(store.execute(op)),
            Step::Hub(op) => Input::Hub(hubs.execute(op)),
            Step::Effect(effect) => Input::Effect(NoEffects.perform(effect, Timestamp::default())),
            Step::Respond(r) => {
                reply.get_or_insert(r);
                Input::Responded
            }
            Step::Finished => return reply.unwrap_or_else(missing_reply),
        };
    }
}

/// Runs a flow to completion against an async store and hub directory; returns the (first) reply.
///
/// To send an early reply before the flow finishes, drive the flow yourself (the loop is six lines).
pub async fn run_async<F: Flow + ?Sized>(
    flow: &mut F,
    store: &impl AsyncStore,
    hubs: &impl AsyncHubDirectory,
) -> Reply {
    let mut reply = None;
    let mut input = Input::Start;
    loop {
        input = match flow.resume(input) {
            Step::Store(op) => Input::Store(store.execute(op).await),
            Step::Hub(op) => Input::Hub(hubs.execute(op).await),
            Step::Effect(effect) => Input::Effect(NoEffects.perform(effect, Timestamp::default())),
            Step::Respond(r) => {
                reply.get_or_insert(r);
                Input::Responded
            }
            Step::Finished => return reply.unwrap_or_else(missing_reply),
        };
    }
}

/// Where [`run_async_until_reply`] stopped.
#[derive(Debug)]
pub enum Progress {
    /// The flow answered and has nothing more to do.
    Done(Reply),
    /// The flow answered early (`respond_before_assignment`) and still has work to do: pass `next` to
    /// [`finish_async`] (typically on a background task) to complete it. Until it completes, polls of the
    /// operation answer `202 assigning`.
    Replied {
        /// The reply to send now.
        reply: Reply,
        /// The step the flow asked for after the reply was delivered.
        next: Step,
    },
}

/// Drives a flow until its first [`Step::Respond`], so the caller can answer the client while the rest of
/// the flow (hub operations, final commit) goes on; see [`Progress`]. A flow that answers last returns
/// [`Progress::Done`] after the same steps as [`run_async`].
///
/// `clock` is read before every resume ([`Flow::resume_at`]); `effects` performs [`Step::Effect`]s.
pub async fn run_async_until_reply<F: Flow + ?Sized>(
    flow: &mut F,
    store: &impl AsyncStore,
    hubs: &impl AsyncHubDirectory,
    effects: &(impl Effects + ?Sized),
    clock: &(impl Fn() -> Timestamp + ?Sized),
) -> Progress {
    let mut input = Input::Start;
    loop {
        input = match flow.resume_at(clock(), input) {
            Step::Store(op) => Input::Store(store.execute(op).await),
            Step::Hub(op) => Input::Hub(hubs.execute(op).await),
            Step::Effect(effect) => Input::Effect(effects.perform_async(effect, clock()).await),
            Step::Respond(reply) => {
                return match flow.resume_at(clock(), Input::Responded) {
                    Step::Finished => Progress::Done(reply),
                    next => Progress::Replied { reply, next },
                };
            }
            Step::Finished => return Progress::Done(missing_reply()),
        };
    }
}

/// Completes a flow after [`Progress::Replied`]: performs `next` and every later step. Replies the flow
/// produces after the first are dropped (the client was already answered).
pub async fn finish_async<F: Flow + ?Sized>(
    flow: &mut F,
    next: Step,
    store: &impl AsyncStore,
    hubs: &impl AsyncHubDirectory,
    effects: &(impl Effects + ?Sized),
    clock: &(impl Fn() -> Timestamp + ?Sized),
) {
    let mut step = next;
    loop {
        let input = match step {
            Step::Store(op) => Input::Store(store.execute(op).await),
            Step::Hub(op) => Input::Hub(hubs.execute(op).await),
            Step::Effect(effect) => Input::Effect(effects.perform_async(effect, clock()).await),
            Step::Respond(_) => Input::Responded,
            Step::Finished => return,
        };
        step = flow.resume_at(clock(), input);
    }
}

/// The blocking twin of [`run_async_until_reply`] + [`finish_async`]: runs the flow to completion and
/// hands the first reply to `on_reply` as soon as the flow produces it (before its remaining hub work and
/// final commit), e.g. to write it to a socket from the same thread.
pub fn run_blocking_with<F: Flow + ?Sized>(
    flow: &mut F,
    store: &impl BlockingStore,
    hubs: &impl BlockingHubDirectory,
    effects: &(impl Effects + ?Sized),
    clock: &(impl Fn() -> Timestamp + ?Sized),
    on_reply: impl FnOnce(Reply),
) {
    let mut on_reply = Some(on_reply);
    let mut input = Input::Start;
    loop {
        input = match flow.resume_at(clock(), input) {
            Step::Store(op) => Input::Store(store.execute(op)),
            Step::Hub(op) => Input::Hub(hubs.execute(op)),
            Step::Effect(effect) => Input::Effect(effects.perform(effect, clock())),
            Step::Respond(r) => {
                if let Some(deliver) = on_reply.take() {
                    deliver(r);
                }
                Input::Responded
            }
            Step::Finished => {
                if let Some(deliver) = on_reply.take() {
                    deliver(missing_reply());
                }
                return;
            }
        };
    }
}
