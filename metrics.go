package pop3

import (
	"errors"

	"github.com/prometheus/client_golang/prometheus"
)

// pop3Metrics are the handler's Prometheus collectors. They are created once
// per process and registered on each config's registry, so the counts go on
// across reloads (each config gets a new registry) and several pop3 handlers
// share them.
type pop3Metrics struct {
	sessions           *prometheus.CounterVec
	activeSessions     prometheus.Gauge
	parkedSessions     prometheus.Gauge
	logins             *prometheus.CounterVec
	loginDuration      *prometheus.HistogramVec
	dialErrors         *prometheus.CounterVec
	upstreamHealthy    *prometheus.GaugeVec
	bytes              *prometheus.CounterVec
	stls               *prometheus.CounterVec
	implicitHandshakes *prometheus.CounterVec
	authCache          *prometheus.CounterVec
	limitRefusals      *prometheus.CounterVec
	blocks             *prometheus.CounterVec
}

func newPOP3Metrics() *pop3Metrics {
	const ns, sub = "caddy", "layer4_pop3"
	return &pop3Metrics{
		sessions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "sessions_total",
			Help: "POP3 sessions ended, by result (ok, quit, client_closed, timeout, idle_timeout, upstream_unavailable, too_many_errors, ...).",
		}, []string{"result"}),
		activeSessions: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: ns, Subsystem: sub, Name: "active_sessions",
			Help: "POP3 sessions open now, before or after login.",
		}),
		parkedSessions: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: ns, Subsystem: sub, Name: "parked_sessions",
			Help: "Logged-in POP3 sessions parked now: quiet, both directions waiting in the epoll set, no goroutine.",
		}),
		logins: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "logins_total",
			Help: "Login attempts by method and result: ok, failed (credentials refused), invalid (malformed or not allowed), cancelled, in_use, login_delay, unavailable (auth server or upstream).",
		}, []string{"method", "result"}),
		loginDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: ns, Subsystem: sub, Name: "login_duration_seconds",
			Help:    "Time of successful logins, from the client's credentials to the upstream's +OK.",
			Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10},
		}, []string{"method"}),
		dialErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "upstream_dial_errors_total",
			Help: "Failed connections to an upstream (dial, TLS, greeting), by upstream.",
		}, []string{"upstream"}),
		upstreamHealthy: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: ns, Subsystem: sub, Name: "upstream_healthy",
			Help: "Whether an upstream passes the active health check (1) or not (0).",
		}, []string{"upstream"}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "bytes_total",
			Help: "Bytes relayed after login, by direction (from_client, to_client).",
		}, []string{"direction"}),
		stls: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "stls_total",
			Help: "STLS upgrades by result (ok, failed, refused).",
		}, []string{"result"}),
		implicitHandshakes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "implicit_tls_total",
			Help: "TLS handshakes of implicit_tls sessions by result: ok (full handshake), resumed (TLS session resumed), failed.",
		}, []string{"result"}),
		authCache: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "auth_cache_total",
			Help: "Lookups in the auth cache by result: hit (an authenticator's answer reused), negative_hit (a refusal reused), miss.",
		}, []string{"result"}),
		limitRefusals: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "limit_refusals_total",
			Help: "Connections, sessions and logins refused by the limits option, by limit (a blocked login counts under its failures_* limit).",
		}, []string{"limit"}),
		blocks: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "blocks_total",
			Help: "Blocks started by the failures_* limits, by limit.",
		}, []string{"limit"}),
	}
}

// register adds the collectors to a config's registry; one already there
// (another pop3 handler of the same config) is fine.
func (m *pop3Metrics) register(reg *prometheus.Registry) error {
	if m == nil || reg == nil {
		return nil
	}
	for _, c := range []prometheus.Collector{m.sessions, m.activeSessions, m.parkedSessions, m.logins, m.loginDuration, m.dialErrors, m.upstreamHealthy, m.bytes, m.stls, m.implicitHandshakes, m.authCache, m.limitRefusals, m.blocks} {
		if err := reg.Register(c); err != nil && !errors.As(err, new(prometheus.AlreadyRegisteredError)) {
			return err
		}
	}
	return nil
}

func (m *pop3Metrics) sessionStarted() {
	if m != nil {
		m.activeSessions.Inc()
	}
}

func (m *pop3Metrics) sessionEnded(result string, fromClient, toClient int64) {
	if m == nil {
		return
	}
	m.activeSessions.Dec()
	m.sessions.WithLabelValues(result).Inc()
	m.bytes.WithLabelValues("from_client").Add(float64(fromClient))
	m.bytes.WithLabelValues("to_client").Add(float64(toClient))
}

// sessionRefused counts a connection turned away before it became a
// session: it was never active and relayed nothing.
func (m *pop3Metrics) sessionRefused(result string) {
	if m != nil {
		m.sessions.WithLabelValues(result).Inc()
	}
}

// parked counts a session that parked (delta 1) or woke or ended parked
// (delta -1).
func (m *pop3Metrics) parked(delta float64) {
	if m != nil {
		m.parkedSessions.Add(delta)
	}
}

func (m *pop3Metrics) login(method, result string, seconds float64) {
	if m == nil {
		return
	}
	m.logins.WithLabelValues(method, result).Inc()
	if seconds >= 0 {
		m.loginDuration.WithLabelValues(method).Observe(seconds)
	}
}

// limitRefused counts a refusal by one of the limits option's limits.
func (m *pop3Metrics) limitRefused(limit string) {
	if m != nil {
		m.limitRefusals.WithLabelValues(limit).Inc()
	}
}

func (m *pop3Metrics) blockStarted(limit string) {
	if m != nil {
		m.blocks.WithLabelValues(limit).Inc()
	}
}

func (m *pop3Metrics) authCacheLookup(result string) {
	if m != nil {
		m.authCache.WithLabelValues(result).Inc()
	}
}

func (m *pop3Metrics) dialError(upstream string) {
	if m != nil {
		m.dialErrors.WithLabelValues(upstream).Inc()
	}
}

func (m *pop3Metrics) health(upstream string, healthy bool) {
	if m == nil {
		return
	}
	v := 0.0
	if healthy {
		v = 1
	}
	m.upstreamHealthy.WithLabelValues(upstream).Set(v)
}

func (m *pop3Metrics) startTLS(result string) {
	if m != nil {
		m.stls.WithLabelValues(result).Inc()
	}
}

func (m *pop3Metrics) implicitTLS(result string) {
	if m != nil {
		m.implicitHandshakes.WithLabelValues(result).Inc()
	}
}
