package delivery

import (
	"container/list"
	"sync"
	"time"

	"github.com/miekg/dns"
)

// dnsCacheMaxTTL caps how long an answer is kept, whatever its TTL: the
// cache is there for bursts of mail to one domain, and a short cap bounds
// how long a changed MX record goes unnoticed.
const dnsCacheMaxTTL = 5 * time.Minute

// dnsCache keeps DNS answers for their TTL (at most dnsCacheMaxTTL), so that
// a burst of mail to one domain asks for its MX records and addresses once
// rather than once per transaction. It holds at most size answers and drops
// the least recently used first. Negative answers (NXDOMAIN, or a name without
// records of the type) are kept only when they carry the zone's SOA, for the
// time RFC 2308 section 5 gives; SERVFAIL, REFUSED and transport errors are
// never kept. A nil *dnsCache keeps nothing.
//
// The cached messages are shared: callers must not modify them.
type dnsCache struct {
	size int
	now  func() time.Time // injected so tests can move the clock

	mu      sync.Mutex
	entries map[dnsKey]*list.Element
	lru     list.List // of *dnsEntry, most recently used at the front
}

type dnsKey struct {
	name  string // canonical: lower case, fully qualified
	qtype uint16
}

type dnsEntry struct {
	key     dnsKey
	msg     *dns.Msg
	expires time.Time
}

// newDNSCache returns a cache of at most size answers, or nil (no cache) when
// size is less than 1.
func newDNSCache(size int) *dnsCache {
	if size < 1 {
		return nil
	}
	return &dnsCache{size: size, now: time.Now, entries: make(map[dnsKey]*list.Element)}
}

func newDNSKey(name string, qtype uint16) dnsKey {
	return dnsKey{name: dns.CanonicalName(name), qtype: qtype}
}

// get returns the answer kept for key, or nil when there is none or it has
// expired.
func (c *dnsCache) get(key dnsKey) *dns.Msg {
	if c == nil {
		return nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	el, ok := c.entries[key]
	if !ok {
		return nil
	}
	e := el.Value.(*dnsEntry)
	if !c.now().Before(e.expires) {
		c.lru.Remove(el)
		delete(c.entries, key)
		return nil
	}
	c.lru.MoveToFront(el)
	return e.msg
}

// put keeps msg, the answer for key, for as long as cacheTTL allows.
func (c *dnsCache) put(key dnsKey, msg *dns.Msg) {
	if c == nil {
		return
	}
	ttl := min(cacheTTL(msg), dnsCacheMaxTTL)
	if ttl <= 0 {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	expires := c.now().Add(ttl)
	if el, ok := c.entries[key]; ok {
		e := el.Value.(*dnsEntry)
		e.msg, e.expires = msg, expires
		c.lru.MoveToFront(el)
		return
	}
	for c.lru.Len() >= c.size {
		oldest := c.lru.Back()
		c.lru.Remove(oldest)
		delete(c.entries, oldest.Value.(*dnsEntry).key)
	}
	c.entries[key] = c.lru.PushFront(&dnsEntry{key: key, msg: msg, expires: expires})
}

// len returns the number of answers kept, expired ones included.
func (c *dnsCache) len() int {
	if c == nil {
		return 0
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.lru.Len()
}

// cacheTTL is how long msg may be kept: the smallest TTL of its answer
// records, or for a negative answer the smaller of the SOA's TTL and its
// MINIMUM field (RFC 2308 section 5). It is 0 for what must not be kept.
func cacheTTL(msg *dns.Msg) time.Duration {
	if msg.Truncated {
		return 0
	}
	var rrs []dns.RR
	switch {
	case msg.Rcode == dns.RcodeSuccess && len(msg.Answer) > 0:
		rrs = msg.Answer
	case msg.Rcode == dns.RcodeSuccess || msg.Rcode == dns.RcodeNameError:
		// RFC 2308 section 5: a negative answer without an SOA is not
		// cached.
		for _, rr := range msg.Ns {
			if soa, ok := rr.(*dns.SOA); ok {
				return time.Duration(min(soa.Hdr.Ttl, soa.Minttl)) * time.Second
			}
		}
		return 0
	default:
		return 0
	}
	ttl := rrs[0].Header().Ttl
	for _, rr := range rrs[1:] {
		ttl = min(ttl, rr.Header().Ttl)
	}
	return time.Duration(ttl) * time.Second
}
