//! The DNS metrics: `beacon_dns_requests_total{proto,qtype}`,
//! `beacon_dns_responses_total{rcode}` and
//! `beacon_dns_request_duration_seconds`.
//!
//! Each handle is resolved once per server, on first use of its label
//! values (the recorder is installed before any loop starts), so no series
//! is shown before it has counted something. UDP threads add their counts
//! in batches ([`UdpTally`]): the shared counters are atomics both cores
//! would otherwise contend on per packet.

use std::sync::OnceLock;
use std::time::Instant;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use metrics::{Counter, Histogram};

use super::wire::{Proto, QType};
use crate::telemetry::{DNS_REQUEST_DURATION, DNS_REQUESTS, DNS_RESPONSES};

/// `qtype` label values; every other type counts as `other`.
const QTYPES: [&str; 9] = ["A", "AAAA", "SRV", "PTR", "TXT", "SOA", "NS", "ANY", "MX"];
/// `rcode` label values; every other rcode counts as `other`.
const RCODES: [&str; 7] = [
    "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "BADVERS",
];
const QTYPE_SLOTS: usize = QTYPES.len() + 1;
const RCODE_SLOTS: usize = RCODES.len() + 1;

fn qtype_index(qtype: QType) -> usize {
    use RecordType as T;
    match qtype {
        Some(T::A) => 0,
        Some(T::AAAA) => 1,
        Some(T::SRV) => 2,
        Some(T::PTR) => 3,
        Some(T::TXT) => 4,
        Some(T::SOA) => 5,
        Some(T::NS) => 6,
        Some(T::ANY) => 7,
        Some(T::MX) => 8,
        _ => 9,
    }
}

fn rcode_index(rcode: ResponseCode) -> usize {
    match rcode {
        ResponseCode::NoError => 0,
        ResponseCode::FormErr => 1,
        ResponseCode::ServFail => 2,
        ResponseCode::NXDomain => 3,
        ResponseCode::NotImp => 4,
        ResponseCode::Refused => 5,
        ResponseCode::BADVERS => 6,
        _ => 7,
    }
}

/// The `rcode` label value of `rcode` (`other` beyond the common ones).
pub fn rcode_label(rcode: ResponseCode) -> &'static str {
    label(&RCODES, rcode_index(rcode))
}

fn label(values: &[&'static str], i: usize) -> &'static str {
    values.get(i).copied().unwrap_or("other")
}

fn proto_index(proto: Proto) -> usize {
    match proto {
        Proto::Udp => 0,
        Proto::Tcp => 1,
        Proto::Dot => 2,
        Proto::Doh => 3,
    }
}

/// The metric handles of one server, shared by all its loops.
#[derive(Debug, Default)]
pub struct DnsMetrics {
    /// By proto (udp, tcp, dot, doh), then qtype slot.
    requests: [[OnceLock<Counter>; QTYPE_SLOTS]; 4],
    responses: [OnceLock<Counter>; RCODE_SLOTS],
    duration: OnceLock<Histogram>,
}

impl DnsMetrics {
    fn requests(&self, proto: Proto, slot: usize) -> &Counter {
        self.requests[proto_index(proto)][slot].get_or_init(|| {
            metrics::counter!(DNS_REQUESTS, "proto" => proto.as_str(), "qtype" => label(&QTYPES, slot))
        })
    }

    fn responses(&self, slot: usize) -> &Counter {
        self.responses[slot]
            .get_or_init(|| metrics::counter!(DNS_RESPONSES, "rcode" => label(&RCODES, slot)))
    }

    fn duration(&self) -> &Histogram {
        self.duration
            .get_or_init(|| metrics::histogram!(DNS_REQUEST_DURATION))
    }

    /// Counts one request at once (TCP and forwarded queries).
    pub fn record(
        &self,
        proto: Proto,
        qtype: QType,
        rcode: Option<ResponseCode>,
        started: Instant,
    ) {
        self.requests(proto, qtype_index(qtype)).increment(1);
        if let Some(rcode) = rcode {
            self.responses(rcode_index(rcode)).increment(1);
        }
        self.duration().record(started.elapsed().as_secs_f64());
    }
}

/// The tallies of one UDP thread between two flushes into [`DnsMetrics`].
pub struct UdpTally {
    requests: [u64; QTYPE_SLOTS],
    responses: [u64; RCODE_SLOTS],
    durations: Vec<f64>,
}

impl UdpTally {
    pub fn new(batch: usize) -> Self {
        Self {
            requests: [0; QTYPE_SLOTS],
            responses: [0; RCODE_SLOTS],
            durations: Vec::with_capacity(batch),
        }
    }

    pub fn record(&mut self, qtype: QType, rcode: Option<ResponseCode>, started: Instant) {
        self.requests[qtype_index(qtype)] += 1;
        if let Some(rcode) = rcode {
            self.responses[rcode_index(rcode)] += 1;
        }
        self.durations.push(started.elapsed().as_secs_f64());
    }

    /// Adds the tallies to the shared metrics and starts over.
    pub fn flush(&mut self, to: &DnsMetrics) {
        if self.durations.is_empty() {
            return;
        }
        for (slot, n) in self.requests.iter_mut().enumerate() {
            if *n > 0 {
                to.requests(Proto::Udp, slot).increment(std::mem::take(n));
            }
        }
        for (slot, n) in self.responses.iter_mut().enumerate() {
            if *n > 0 {
                to.responses(slot).increment(std::mem::take(n));
            }
        }
        let histogram = to.duration();
        for d in self.durations.drain(..) {
            histogram.record(d);
        }
    }
}

#[cfg(test)]
mod tests;
