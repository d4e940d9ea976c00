package main

import (
	"image/png"
	"math"
	"os"
	"path/filepath"
	"testing"
	"time"
)

func TestMedianPercentile(t *testing.T) {
	if got := median([]float64{3, 1, 2}); got != 2 {
		t.Errorf("median odd = %v", got)
	}
	if got := median([]float64{4, 1, 3, 2}); got != 2.5 {
		t.Errorf("median even = %v", got)
	}
	if !math.IsNaN(median(nil)) {
		t.Error("median of nothing is not NaN")
	}
	var lat []time.Duration
	for i := 1; i <= 100; i++ {
		lat = append(lat, time.Duration(i)*time.Millisecond)
	}
	for _, c := range []struct {
		p    float64
		want time.Duration
	}{{50, 50 * time.Millisecond}, {99, 99 * time.Millisecond}, {100, 100 * time.Millisecond}, {0, time.Millisecond}} {
		if got := percentile(lat, c.p); got != c.want {
			t.Errorf("p%v = %v, want %v", c.p, got, c.want)
		}
	}
	if got := niceStep(57, 6); got != 10 {
		t.Errorf("niceStep(57, 6) = %v", got)
	}
}

func TestMessageDotStuff(t *testing.T) {
	msg := message(64 << 10)
	if len(msg) < 64<<10 {
		t.Fatalf("message is %d bytes", len(msg))
	}
	got := dotStuff([]byte("a\r\n.b\r\n..c\r\n"))
	if string(got) != "a\r\n..b\r\n...c\r\n" {
		t.Errorf("dotStuff = %q", got)
	}
}

func TestDrawCDFs(t *testing.T) {
	var a, b []time.Duration
	for i := 0; i < 500; i++ {
		a = append(a, time.Duration(1000+i*37%4000)*time.Microsecond)
		b = append(b, time.Duration(3000+i*53%9000)*time.Microsecond)
	}
	file := filepath.Join(t.TempDir(), "cdf.png")
	panels := []panel{
		{title: "plain", series: []series{{nameDirect, a, pathColor[nameDirect]}, {nameCaddy, b, pathColor[nameCaddy]}, {nameNginx, nil, pathColor[nameNginx]}}},
		{title: "TLS (995)", series: []series{{nameDirect, b, pathColor[nameDirect]}}},
	}
	if err := drawCDFs(file, "title", "subtitle", panels); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(file)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := png.Decode(f); err != nil {
		t.Fatal(err)
	}
}
