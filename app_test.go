package pop3

import (
	"encoding/json"
	"time"

	"testing"

	"github.com/caddyserver/caddy/v2"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

func TestAppCaddyfile(t *testing.T) {
	t.Parallel()
	d := caddyfile.NewTestDispenser(`pop3 {
		redis 10.0.0.1:26379 10.0.0.2:26379 {
			username proxy
			password {env.REDIS_PASSWORD}
			db 2
			tls
			tls_server_name redis.internal
			sentinel mymaster
			key_prefix site1:
			timeout 150ms
		}
		on_store_failure closed
		instance pop3-a
		shared_key {env.POP3_SHARED_KEY}
	}`)
	var a App
	if err := a.UnmarshalCaddyfile(d); err != nil {
		t.Fatal(err)
	}
	got, _ := json.Marshal(&a)
	want := `{"redis":{"addresses":["10.0.0.1:26379","10.0.0.2:26379"],"username":"proxy","password":"{env.REDIS_PASSWORD}","db":2,"tls":{"server_name":"redis.internal"},"sentinel":"mymaster","key_prefix":"site1:","timeout":150000000},"on_store_failure":"closed","instance":"pop3-a","shared_key":"{env.POP3_SHARED_KEY}"}`
	if string(got) != want {
		t.Fatalf("app:\n got %s\nwant %s", got, want)
	}
	for _, bad := range []string{
		"redis",
		"redis 127.0.0.1:6379 {\ndb x\n}",
		"redis 127.0.0.1:6379 {\ntimeout 0s\n}",
		"redis 127.0.0.1:6379 {\nfrobnicate\n}",
		"on_store_failure maybe",
		"instance",
		"instance a\ninstance b",
		"nonsense 1",
	} {
		var a App
		if err := a.UnmarshalCaddyfile(caddyfile.NewTestDispenser("pop3 {\n" + bad + "\n}")); err == nil {
			t.Errorf("%q: no error", bad)
		}
	}
	var a2 App
	if err := a2.UnmarshalCaddyfile(caddyfile.NewTestDispenser("pop3 extra {\n}")); err == nil {
		t.Error("pop3 with an argument: no error")
	}
}

func TestAppValidate(t *testing.T) {
	for _, a := range []*App{
		{OnStoreFailure: "sometimes"},
		{Redis: &RedisConfig{}},
		{Redis: &RedisConfig{Addresses: []string{"a:1", "b:1"}, DB: 1}},
		{Redis: &RedisConfig{Addresses: []string{"a:1"}, DB: -1}},
	} {
		if err := a.Validate(); err == nil {
			t.Errorf("%+v: no error", a)
		}
	}
	t.Setenv("POP3_TEST_REDIS_PASSWORD", "hunter2")
	a := &App{Redis: &RedisConfig{Addresses: []string{"127.0.0.1:6379"}, Password: "{env.POP3_TEST_REDIS_PASSWORD}"}}
	if err := a.Provision(caddy.Context{}); err != nil {
		t.Fatal(err)
	}
	if a.Redis.Password != "hunter2" || a.Redis.KeyPrefix != "caddy-pop3:" || time.Duration(a.Redis.Timeout) != defaultRedisTimeout || a.OnStoreFailure != "open" || a.Instance == "" {
		t.Fatalf("provisioned %+v %+v", a, a.Redis)
	}
}
