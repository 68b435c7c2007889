//! Object-safe forms of the store and hub-directory contracts, so a host can hold `Arc<dyn DynStore>` and
//! `Arc<dyn DynHubDirectory>` chosen at run time (SQLite, PostgreSQL, an embedder's own), and drive flows
//! with them exactly like a concrete backend.
//!
//! Every [`AsyncStore`] / [`AsyncHubDirectory`] that is `Send + Sync` is a `DynStore` / `DynHubDirectory`
//! through a blanket impl; `dyn DynStore` is itself an [`AsyncStore`], so
//! [`run_async`](crate::flow::run_async) takes `&Arc<dyn DynStore>` as it is. The cost is one boxed future
//! per store or hub operation.

use crate::hub::{AsyncHubDirectory, HubError, HubOp, HubResult};
use crate::store::{AsyncStore, StoreError, StoreOp, StoreResult};
use std::future::Future;
use std::pin::Pin;

/// A boxed, sendable future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// An object-safe [`AsyncStore`].
pub trait DynStore: Send + Sync {
    /// Performs one operation.
    fn execute_boxed(&self, op: StoreOp) -> BoxFuture<'_, Result<StoreResult, StoreError>>;
}

impl<T: AsyncStore + Send + Sync> DynStore for T {
    fn execute_boxed(&self, op: StoreOp) -> BoxFuture<'_, Result<StoreResult, StoreError>> {
        Box::pin(self.execute(op))
    }
}

impl<'a> AsyncStore for dyn DynStore + 'a {
    fn execute(&self, op: StoreOp) -> impl Future<Output = Result<StoreResult, StoreError>> + Send {
        self.execute_boxed(op)
    }
}

/// An object-safe [`AsyncHubDirectory`].
pub trait DynHubDirectory: Send + Sync {
    /// Performs one operation.
    fn execute_boxed(&self, op: HubOp) -> BoxFuture<'_, Result<HubResult, HubError>>;
}

impl<T: AsyncHubDirectory + Send + Sync> DynHubDirectory for T {
    fn execute_boxed(&self, op: HubOp) -> BoxFuture<'_, Result<HubResult, HubError>> {
        Box::pin(self.execute(op))
    }
}

impl<'a> AsyncHubDirectory for dyn DynHubDirectory + 'a {
    fn execute(&self, op: HubOp) -> impl Future<Output = Result<HubResult, HubError>> + Send {
        self.execute_boxed(op)
    }
}
