//! Backpressure from a downstream HTTP/2 connection to the upstreams feeding it.
//!
//! hyper's HTTP/2 server pulls a response body's next chunk as soon as it has handed the last
//! one to h2, and h2 queues whatever the client's flow-control windows allow, which the client
//! chooses (up to 2 GiB per stream). A client opening many streams with wide windows and never
//! reading the socket would make lbd read every response from its upstream into memory
//! (CVE-2019-9517). So each chunk handed to hyper carries a guard that tells when h2 is done
//! with it (written to the socket, or discarded with its stream), and a stream pulls its next
//! chunk from upstream only while its own chunks still held by h2 stay under
//! [`STREAM_AHEAD`] and the whole connection's under [`CONN_AHEAD`]. Otherwise the upstream is
//! not read: an HTTP/1.1 backend fills its socket and waits, an HTTP/2 one runs out of stream
//! window (see `h2::pool`).
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http_body::{Body, Frame, SizeHint};

/// Response bytes one stream may have in h2's hands before it stops pulling from upstream.
/// The chunk in hand may overshoot it by one upstream read.
pub const STREAM_AHEAD: usize = 64 * 1024;

/// Response bytes one downstream connection may have in h2's hands, over all its streams.
/// Enough to keep a fast client's socket busy (the kernel's send buffer does the rest), small
/// enough that 10,000 abusive connections cannot take the host's memory.
pub const CONN_AHEAD: usize = 2 * 1024 * 1024;

/// The bytes held for one downstream connection, and the streams waiting for them to drop.
#[derive(Debug, Default)]
pub struct ConnBudget {
    held: AtomicUsize,
    waiters: Mutex<Vec<Waker>>,
}

impl ConnBudget {
    /// Whether the connection is at its bound; if so, `cx` is woken when it is not any more.
    fn full(&self, cx: &Context<'_>) -> bool {
        if self.held.load(Ordering::Acquire) < CONN_AHEAD {
            return false;
        }
        if let Ok(mut w) = self.waiters.lock()
            && !w.iter().any(|w| w.will_wake(cx.waker()))
        {
            w.push(cx.waker().clone());
        }
        // Checked again after registering: a release in between has found the waker, or is
        // seen here.
        self.held.load(Ordering::Acquire) >= CONN_AHEAD
    }

    fn release(&self, n: usize) {
        let before = self.held.fetch_sub(n, Ordering::AcqRel);
        if before - n < CONN_AHEAD
            && let Ok(mut w) = self.waiters.lock()
        {
            for waker in w.drain(..) {
                waker.wake();
            }
        }
    }
}

#[derive(Debug, Default)]
struct StreamBudget {
    held: AtomicUsize,
    waker: AtomicWaker,
}

/// A response body whose data chunks count against their stream's and connection's budgets
/// until h2 drops them.
#[derive(Debug)]
pub struct Budgeted<B> {
    inner: B,
    conn: Arc<ConnBudget>,
    stream: Arc<StreamBudget>,
}

impl<B> Budgeted<B> {
    /// Wraps `inner`, one stream of the connection whose budget is `conn`.
    pub fn new(inner: B, conn: &Arc<ConnBudget>) -> Self {
        Budgeted {
            inner,
            conn: Arc::clone(conn),
            stream: Arc::default(),
        }
    }
}

/// A chunk in h2's hands; dropping it gives its bytes back.
struct Held {
    data: Bytes,
    conn: Arc<ConnBudget>,
    stream: Arc<StreamBudget>,
}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let n = self.data.len();
        self.stream.held.fetch_sub(n, Ordering::AcqRel);
        self.stream.waker.wake();
        self.conn.release(n);
    }
}

impl<B> Body for Budgeted<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        if this.stream.held.load(Ordering::Acquire) >= STREAM_AHEAD {
            this.stream.waker.register(cx.waker());
            if this.stream.held.load(Ordering::Acquire) >= STREAM_AHEAD {
                return Poll::Pending;
            }
        }
        if this.conn.full(cx) {
            return Poll::Pending;
        }
        let frame = match std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            other => return Poll::Ready(other),
        };
        let frame = match frame.into_data() {
            Ok(data) if !data.is_empty() => {
                let n = data.len();
                this.stream.held.fetch_add(n, Ordering::AcqRel);
                this.conn.held.fetch_add(n, Ordering::AcqRel);
                Frame::data(Bytes::from_owner(Held {
                    data,
                    conn: Arc::clone(&this.conn),
                    stream: Arc::clone(&this.stream),
                }))
            }
            Ok(data) => Frame::data(data),
            Err(frame) => frame,
        };
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt as _, StreamBody};

    fn body(chunks: usize, size: usize) -> impl Body<Data = Bytes, Error = ()> + Unpin {
        let chunk = Bytes::from(vec![0u8; size]);
        StreamBody::new(futures_util::stream::iter(
            (0..chunks).map(move |_| Ok::<_, ()>(Frame::data(chunk.clone()))),
        ))
    }

    #[tokio::test]
    async fn a_stream_stops_pulling_until_its_chunks_are_dropped() {
        let conn = Arc::new(ConnBudget::default());
        let mut b = Budgeted::new(body(4, STREAM_AHEAD / 2), &conn);
        let mut kept = Vec::new();
        for _ in 0..2 {
            let f = b.frame().await.expect("frame").expect("ok");
            kept.push(f.into_data().expect("data"));
        }
        assert_eq!(conn.held.load(Ordering::Relaxed), STREAM_AHEAD);
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut b).poll_frame(&mut cx).is_pending());
        // A slice outliving its parent keeps the bytes counted: h2 splits chunks into frames.
        let tail = kept[0].slice(1..);
        kept.remove(0);
        assert!(Pin::new(&mut b).poll_frame(&mut cx).is_pending());
        drop(tail);
        assert_eq!(conn.held.load(Ordering::Relaxed), STREAM_AHEAD / 2);
        assert!(b.frame().await.is_some());
        drop((kept, b));
        assert_eq!(conn.held.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn streams_of_a_connection_share_its_bound() {
        let conn = Arc::new(ConnBudget::default());
        let chunk = STREAM_AHEAD;
        let mut kept = Vec::new();
        let mut bodies: Vec<_> = (0..CONN_AHEAD / chunk + 1)
            .map(|_| Budgeted::new(body(2, chunk), &conn))
            .collect();
        for b in &mut bodies[..CONN_AHEAD / chunk] {
            kept.push(b.frame().await.expect("frame").expect("ok"));
        }
        let last = bodies.last_mut().expect("one more");
        let (waker, woken) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut *last).poll_frame(&mut cx).is_pending());
        kept.pop();
        assert_eq!(
            woken.load(Ordering::Relaxed),
            1,
            "woken when bytes come back"
        );
        assert!(Pin::new(last).poll_frame(&mut cx).is_ready());
    }

    fn counting_waker() -> (Waker, Arc<AtomicUsize>) {
        struct Count(Arc<AtomicUsize>);
        impl std::task::Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        let n = Arc::new(AtomicUsize::new(0));
        (Waker::from(Arc::new(Count(Arc::clone(&n)))), n)
    }
}
