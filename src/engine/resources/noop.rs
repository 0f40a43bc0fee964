//! `noop`: a resource that is always in its desired state; a join point for edges.

use super::meta::Meta;
use super::{ApplyContext, Kind, Outcome, Poke, Resource, ResourceId};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NoopSpec {
    pub name: String,
    #[serde(default, skip_serializing_if = "Meta::is_default")]
    pub meta: Meta,
}

pub struct NoopResource {
    id: ResourceId,
}

impl NoopResource {
    pub fn new(spec: NoopSpec) -> Self {
        NoopResource {
            id: ResourceId::new(Kind::Noop, spec.name),
        }
    }
}

impl Resource for NoopResource {
    fn id(&self) -> &ResourceId {
        &self.id
    }

    fn check_apply(&self, _ctx: ApplyContext) -> BoxFuture<'_, anyhow::Result<Outcome>> {
        Box::pin(async { Ok(Outcome::Unchanged) })
    }

    fn watch(&self, _poke: Poke, _cancel: CancellationToken) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async { Ok(()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn noop_is_always_in_its_desired_state() {
        let res = NoopResource::new(NoopSpec {
            name: "n1".into(),
            ..NoopSpec::default()
        });
        let outcome = res
            .check_apply(ApplyContext {
                noop: false,
                refresh: true,
            })
            .await
            .expect("noop never fails");
        assert_eq!(outcome, Outcome::Unchanged);
        assert_eq!(res.id().to_string(), "noop[n1]");
    }
}
