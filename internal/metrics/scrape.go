package metrics

import (
	"context"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// queueCacheTTL is how long a queue count is reused: several Prometheus
// servers scraping one instance, or a dashboard refreshing, must not turn
// into a stream of count queries.
const queueCacheTTL = 5 * time.Second

// scrapeTimeout bounds the database reads of one scrape.
const scrapeTimeout = 2 * time.Second

var (
	acceptedDesc = prometheus.NewDesc("posthaste_messages_accepted_total",
		"Messages accepted by the API (committed for delivery).", nil, nil)
	queueDesc = prometheus.NewDesc("posthaste_queue_depth",
		"Recipients waiting or in flight, by state.", []string{"state"}, nil)
	oldestDesc = prometheus.NewDesc("posthaste_queue_oldest_due_seconds",
		"How long the oldest due recipient has waited past its due time; 0 when none is due.", nil, nil)
	poolDesc = prometheus.NewDesc("posthaste_db_pool_connections",
		"Database pool connections: idle, in_use, total (open) and max.", []string{"state"}, nil)
	retentionDesc = prometheus.NewDesc("posthaste_retention_rows_total",
		"Rows the retention janitor purged (bodies removed) or deleted.", []string{"action"}, nil)
	readyDesc = prometheus.NewDesc("posthaste_ready",
		"1 while the process is ready to serve (database reachable, schema current), else 0.", nil, nil)
)

// scrapeCollector reads Sources at scrape time.
type scrapeCollector struct {
	m *Metrics

	cachedAt time.Time
	counts   map[string]int64
	oldest   time.Duration
	ok       bool
}

func (c *scrapeCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{acceptedDesc, queueDesc, oldestDesc, poolDesc, retentionDesc, readyDesc} {
		ch <- d
	}
}

func (c *scrapeCollector) Collect(ch chan<- prometheus.Metric) {
	c.m.mu.Lock()
	defer c.m.mu.Unlock()
	s := c.m.sources
	ctx, cancel := context.WithTimeout(context.Background(), scrapeTimeout)
	defer cancel()
	if s.Accepted != nil {
		ch <- prometheus.MustNewConstMetric(acceptedDesc, prometheus.CounterValue, float64(s.Accepted()))
	}
	if s.Queue != nil {
		now := time.Now()
		if c.cachedAt.IsZero() || now.Sub(c.cachedAt) >= queueCacheTTL {
			counts, oldest, err := s.Queue(ctx, now)
			c.cachedAt, c.ok = now, err == nil
			c.counts, c.oldest = counts, oldest
		}
		// A failed count leaves the series out rather than reporting 0,
		// which would look like an empty queue.
		if c.ok {
			for _, st := range queueStates {
				ch <- prometheus.MustNewConstMetric(queueDesc, prometheus.GaugeValue, float64(c.counts[st]), st)
			}
			ch <- prometheus.MustNewConstMetric(oldestDesc, prometheus.GaugeValue, c.oldest.Seconds())
		}
	}
	if s.Pool != nil {
		st := s.Pool()
		for _, v := range []struct {
			state string
			n     int32
		}{
			{"idle", st.IdleConns()}, {"in_use", st.AcquiredConns()},
			{"total", st.TotalConns()}, {"max", st.MaxConns()},
		} {
			ch <- prometheus.MustNewConstMetric(poolDesc, prometheus.GaugeValue, float64(v.n), v.state)
		}
	}
	if s.Retention != nil {
		purged, deleted := s.Retention()
		ch <- prometheus.MustNewConstMetric(retentionDesc, prometheus.CounterValue, float64(purged), "purged")
		ch <- prometheus.MustNewConstMetric(retentionDesc, prometheus.CounterValue, float64(deleted), "deleted")
	}
	if s.Ready != nil {
		v := 0.0
		if s.Ready(ctx) {
			v = 1
		}
		ch <- prometheus.MustNewConstMetric(readyDesc, prometheus.GaugeValue, v)
	}
}
