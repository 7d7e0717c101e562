//! A query waiting for the upstreams, as the handler hands it to the UDP,
//! TCP, DoT and DoH shells: plain forwarding, or an autopath candidate.

use std::sync::Arc;

use hickory_proto::op::{Message, ResponseCode};

use super::autopath;
use super::forward::Forwarder;

/// A query waiting for the upstreams.
#[derive(Debug)]
pub struct ForwardJob {
    pub forwarder: Arc<Forwarder>,
    pub request: Message,
    /// Reply size limit for the client.
    pub limit: usize,
    /// `[dns] autopath` found that the client meant another name: forward
    /// that one and answer with a CNAME to it.
    pub autopath: Option<autopath::Pending>,
}

impl ForwardJob {
    /// Resolves the job into the reply bytes for the client and its rcode.
    pub async fn run(self) -> (Vec<u8>, ResponseCode) {
        match self.autopath {
            None => self.forwarder.reply(&self.request, self.limit).await,
            Some(p) => autopath::finish(&self.forwarder, &self.request, p, self.limit).await,
        }
    }
}
