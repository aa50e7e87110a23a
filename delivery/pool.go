package delivery

import (
	"net/netip"
	"slices"
	"sync"
	"time"
)

// poolKey identifies where a connection goes. The MX host name is part of
// the key because it chose the TLS server name.
type poolKey struct {
	Host string
	IP   netip.Addr
	Port int
}

func keyOf(t target) poolKey { return poolKey{Host: t.Host, IP: t.IP, Port: t.Port} }

// pool keeps SMTP connections open between transactions so that mail for the
// same host skips the connect, greeting, EHLO and TLS handshake. Connections
// wait at most idleTimeout and serve at most maxReuse transactions: servers
// drop idle clients after a while anyway (RFC 5321 section 4.5.3.2.7), and
// capping reuse spreads load over the MX hosts as DNS changes.
type pool struct {
	idleTimeout time.Duration
	maxReuse    int

	mu       sync.Mutex
	idle     map[poolKey][]*smtpConn
	quitting map[*smtpConn]struct{} // waiting for the reply to QUIT
	closed   bool
	cutOff   bool           // close's deadline passed: no more waiting for QUIT
	wg       sync.WaitGroup // idle timers and background QUITs
}

func newPool(idleTimeout time.Duration, maxReuse int) *pool {
	return &pool{idleTimeout: idleTimeout, maxReuse: maxReuse,
		idle: make(map[poolKey][]*smtpConn), quitting: make(map[*smtpConn]struct{})}
}

// get returns an idle connection for key, or nil. The caller owns it and
// should RSET it before use: the server may have closed it meanwhile.
func (p *pool) get(key poolKey) *smtpConn {
	p.mu.Lock()
	defer p.mu.Unlock()
	conns := p.idle[key]
	for i := len(conns) - 1; i >= 0; i-- {
		// Most recently used first: it is the least likely to have been
		// dropped by the server.
		sc := conns[i]
		if !sc.idle.Stop() {
			// Its timer fired and expire is waiting for the lock; the
			// connection stays listed for expire to find and close.
			continue
		}
		p.wg.Done()
		sc.idle = nil
		conns = slices.Delete(conns, i, i+1)
		if len(conns) == 0 {
			delete(p.idle, key)
		} else {
			p.idle[key] = conns
		}
		return sc
	}
	return nil
}

// put takes back a connection after a transaction. Broken or worn-out
// connections are closed, the latter with QUIT in the background.
func (p *pool) put(sc *smtpConn) { p.putLimited(sc, 0) }

// putLimited is put for a connection whose provider allows at most
// maxUses transactions on one connection; 0 keeps the pool's maxReuse.
func (p *pool) putLimited(sc *smtpConn, maxUses int) {
	limit := p.maxReuse
	if maxUses > 0 {
		limit = min(limit, maxUses)
	}
	if sc.broken {
		sc.raw.Close()
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed || sc.uses >= limit {
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			p.quit(sc)
		}()
		return
	}
	key := keyOf(sc.target)
	p.wg.Add(1)
	sc.idle = time.AfterFunc(p.idleTimeout, func() { p.expire(key, sc) })
	p.idle[key] = append(p.idle[key], sc)
}

// discard ends a connection taken with get that will not be used, with
// QUIT in the background.
func (p *pool) discard(sc *smtpConn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		p.quit(sc)
	}()
}

// expire closes a connection that waited too long.
func (p *pool) expire(key poolKey, sc *smtpConn) {
	defer p.wg.Done()
	p.mu.Lock()
	conns := p.idle[key]
	found := false
	for i, c := range conns {
		if c == sc {
			conns = append(conns[:i], conns[i+1:]...)
			found = true
			break
		}
	}
	if len(conns) == 0 {
		delete(p.idle, key)
	} else {
		p.idle[key] = conns
	}
	p.mu.Unlock()
	if found {
		p.quit(sc)
	}
}

// quit ends sc's session with QUIT, unless close's deadline has passed, when
// it is closed at once.
func (p *pool) quit(sc *smtpConn) {
	p.mu.Lock()
	if p.cutOff {
		p.mu.Unlock()
		sc.raw.Close()
		return
	}
	p.quitting[sc] = struct{}{}
	p.mu.Unlock()
	sc.quit()
	p.mu.Lock()
	delete(p.quitting, sc)
	p.mu.Unlock()
}

// close sends QUIT on every idle connection and waits for that and for the
// connections being closed in the background, but not past deadline: then
// the connections still waiting for a reply to QUIT are closed under it.
// Connections put back later are closed at once.
func (p *pool) close(deadline time.Time) {
	p.mu.Lock()
	p.closed = true
	var conns []*smtpConn
	for key, list := range p.idle {
		// Connections whose timer already fired stay listed for expire.
		list = slices.DeleteFunc(list, func(sc *smtpConn) bool {
			if !sc.idle.Stop() {
				return false
			}
			p.wg.Done()
			conns = append(conns, sc)
			return true
		})
		if len(list) == 0 {
			delete(p.idle, key)
		} else {
			p.idle[key] = list
		}
	}
	p.mu.Unlock()

	for _, sc := range conns {
		p.wg.Go(func() { p.quit(sc) })
	}
	done := make(chan struct{})
	go func() {
		p.wg.Wait()
		close(done)
	}()
	timer := time.NewTimer(time.Until(deadline))
	defer timer.Stop()
	select {
	case <-done:
		return
	case <-timer.C:
	}
	p.mu.Lock()
	p.cutOff = true
	for sc := range p.quitting {
		sc.raw.Close()
	}
	p.mu.Unlock()
	<-done
}

// evictIdle closes, with QUIT in the background, one idle connection whose
// host match accepts, and reports whether it found one. A provider at its
// connection limit uses it to turn an idle connection to one of its hosts
// into a slot for a transaction that is waiting.
func (p *pool) evictIdle(match func(host string) bool) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	for key, list := range p.idle {
		if !match(key.Host) {
			continue
		}
		for i, sc := range list {
			if !sc.idle.Stop() {
				continue // expire has it
			}
			// The timer's share of wg now belongs to the QUIT below.
			sc.idle = nil
			list = slices.Delete(list, i, i+1)
			if len(list) == 0 {
				delete(p.idle, key)
			} else {
				p.idle[key] = list
			}
			go func() {
				defer p.wg.Done()
				p.quit(sc)
			}()
			return true
		}
	}
	return false
}

// has reports whether an idle connection for key is waiting.
func (p *pool) has(key poolKey) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.idle[key]) > 0
}

// idleCount returns the number of idle connections.
func (p *pool) idleCount() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for _, list := range p.idle {
		n += len(list)
	}
	return n
}
