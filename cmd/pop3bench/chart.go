package main

import (
	"fmt"
	"image"
	"image/color"
	"image/png"
	"math"
	"os"
	"slices"
	"time"
)

// The login latency chart: one panel per mode, each with the cumulative
// distribution of session latencies of every target. Drawn with the
// standard library only: lines, rectangles and a 5x8 bitmap font.

// series is one line of a panel.
type series struct {
	name string
	lat  []time.Duration
	col  color.RGBA
}

type panel struct {
	title  string
	series []series
}

var (
	white     = color.RGBA{255, 255, 255, 255}
	black     = color.RGBA{0, 0, 0, 255}
	gridGray  = color.RGBA{225, 225, 225, 255}
	axisGray  = color.RGBA{90, 90, 90, 255}
	pathColor = map[string]color.RGBA{
		nameDirect: {40, 90, 200, 255},  // blue
		nameCaddy:  {20, 150, 60, 255},  // green
		nameNginx:  {220, 110, 20, 255}, // orange
	}
)

type canvas struct {
	*image.RGBA
}

func newCanvas(w, h int) canvas {
	img := image.NewRGBA(image.Rect(0, 0, w, h))
	for i := range img.Pix {
		img.Pix[i] = 255
	}
	return canvas{img}
}

func (c canvas) fill(x0, y0, x1, y1 int, col color.RGBA) {
	for y := y0; y < y1; y++ {
		for x := x0; x < x1; x++ {
			c.SetRGBA(x, y, col)
		}
	}
}

// line draws a line of the given width (Bresenham, with a square pen).
func (c canvas) line(x0, y0, x1, y1, width int, col color.RGBA) {
	dx, dy := abs(x1-x0), -abs(y1-y0)
	sx, sy := sign(x1-x0), sign(y1-y0)
	e := dx + dy
	for {
		c.fill(x0-width/2, y0-width/2, x0-width/2+width, y0-width/2+width, col)
		if x0 == x1 && y0 == y1 {
			return
		}
		e2 := 2 * e
		if e2 >= dy {
			e += dy
			x0 += sx
		}
		if e2 <= dx {
			e += dx
			y0 += sy
		}
	}
}

func abs(v int) int {
	if v < 0 {
		return -v
	}
	return v
}

func sign(v int) int {
	switch {
	case v < 0:
		return -1
	case v > 0:
		return 1
	}
	return 0
}

// text draws s with its top-left corner at (x, y), each font pixel scale
// pixels wide; it returns the width drawn.
func (c canvas) text(x, y, scale int, s string, col color.RGBA) int {
	for i, r := range s {
		if r < 32 || r > 126 {
			r = '?'
		}
		g := font5x8[r-32]
		for cx := 0; cx < 5; cx++ {
			for cy := 0; cy < 8; cy++ {
				if g[cx]&(1<<cy) != 0 {
					px := x + (i*6+cx)*scale
					c.fill(px, y+cy*scale, px+scale, y+(cy+1)*scale, col)
				}
			}
		}
	}
	return textWidth(s, scale)
}

func textWidth(s string, scale int) int { return len(s) * 6 * scale }

// niceStep picks a grid step of 1, 2 or 5 times a power of ten giving about
// n intervals over span.
func niceStep(span float64, n int) float64 {
	raw := span / float64(n)
	p := math.Pow(10, math.Floor(math.Log10(raw)))
	for _, m := range []float64{1, 2, 5, 10} {
		if m*p >= raw {
			return m * p
		}
	}
	return 10 * p
}

func fmtTick(v, step float64) string {
	if step >= 1 {
		return fmt.Sprintf("%.0f", v)
	}
	dec := int(math.Ceil(-math.Log10(step)))
	return fmt.Sprintf("%.*f", dec, v)
}

// drawCDFs renders the panels side by side into a PNG file. The x axis of
// each panel runs from 0 to the largest p99.5 of its series (the slowest
// half percent is left out so the body stays readable).
func drawCDFs(file, title, subtitle string, panels []panel) error {
	const (
		pw, ph           = 520, 420 // panel size
		left, right      = 70, 20
		top, bottom      = 50, 60
		headH, legendH   = 64, 40
		scale            = 2
		smallScale       = 1
		clipPct          = 99.5
		lineW            = 3
		gridN            = 6
		yGridStepPercent = 10
	)
	w := len(panels) * pw
	h := headH + ph + legendH
	c := newCanvas(w, h)
	c.text(16, 10, scale+1, title, black)
	c.text(16, 40, smallScale+1, subtitle, axisGray)

	for pi, p := range panels {
		ox, oy := pi*pw, headH
		x0, x1 := ox+left, ox+pw-right
		y0, y1 := oy+top, oy+ph-bottom // plot area: y0 top, y1 bottom
		// x range
		xmax := 0.0
		for _, s := range p.series {
			if len(s.lat) == 0 {
				continue
			}
			sorted := slices.Clone(s.lat)
			slices.Sort(sorted)
			xmax = math.Max(xmax, ms(percentile(sorted, clipPct)))
		}
		if xmax <= 0 {
			xmax = 1
		}
		step := niceStep(xmax, gridN)
		xmax = math.Ceil(xmax/step) * step
		px := func(v float64) int { return x0 + int(math.Round(v/xmax*float64(x1-x0))) }
		py := func(f float64) int { return y1 - int(math.Round(f*float64(y1-y0))) }

		// grid and labels
		for v := 0.0; v <= xmax+step/2; v += step {
			x := px(v)
			c.line(x, y0, x, y1, 1, gridGray)
			lab := fmtTick(v, step)
			c.text(x-textWidth(lab, scale)/2, y1+8, scale, lab, axisGray)
		}
		for pct := 0; pct <= 100; pct += yGridStepPercent {
			y := py(float64(pct) / 100)
			c.line(x0, y, x1, y, 1, gridGray)
			if pct%20 == 0 {
				lab := fmt.Sprintf("%d%%", pct)
				c.text(x0-8-textWidth(lab, scale), y-8, scale, lab, axisGray)
			}
		}
		c.line(x0, y1, x1, y1, 2, axisGray)
		c.line(x0, y0, x0, y1, 2, axisGray)
		c.text(x0+(x1-x0)/2-textWidth(p.title, scale)/2, oy+14, scale, p.title, black)
		xl := "session latency, ms"
		c.text(x0+(x1-x0)/2-textWidth(xl, scale)/2, y1+32, scale, xl, axisGray)

		// the CDFs
		for _, s := range p.series {
			if len(s.lat) == 0 {
				continue
			}
			sorted := slices.Clone(s.lat)
			slices.Sort(sorted)
			n := float64(len(sorted))
			prevX, prevY := px(0), py(0)
			// one point per horizontal pixel: the fraction at or below it
			j := 0
			for x := x0; x <= x1; x++ {
				v := float64(x-x0) / float64(x1-x0) * xmax
				for j < len(sorted) && ms(sorted[j]) <= v {
					j++
				}
				y := py(float64(j) / n)
				c.line(prevX, prevY, x, y, lineW, s.col)
				prevX, prevY = x, y
			}
		}
	}

	// legend
	lx, ly := 16, headH+ph+8
	if len(panels) > 0 {
		for _, s := range panels[0].series {
			c.fill(lx, ly+6, lx+36, ly+12, s.col)
			lx += 44
			lx += c.text(lx, ly, scale, s.name, black) + 28
		}
	}
	c.text(lx+20, ly+4, smallScale+1, fmt.Sprintf("x axis up to the largest p%.1f", clipPct), axisGray)

	f, err := os.Create(file)
	if err != nil {
		return err
	}
	if err := png.Encode(f, c.RGBA); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// font5x8 is the classic 5x7 LCD font (ASCII 32 to 126): five columns per
// glyph, bit 0 the top row, bit 7 the descender row.
var font5x8 = [95][5]byte{
	{0x00, 0x00, 0x00, 0x00, 0x00}, // ' '
	{0x00, 0x00, 0x5F, 0x00, 0x00}, // !
	{0x00, 0x07, 0x00, 0x07, 0x00}, // "
	{0x14, 0x7F, 0x14, 0x7F, 0x14}, // #
	{0x24, 0x2A, 0x7F, 0x2A, 0x12}, // $
	{0x23, 0x13, 0x08, 0x64, 0x62}, // %
	{0x36, 0x49, 0x56, 0x20, 0x50}, // &
	{0x00, 0x08, 0x07, 0x03, 0x00}, // '
	{0x00, 0x1C, 0x22, 0x41, 0x00}, // (
	{0x00, 0x41, 0x22, 0x1C, 0x00}, // )
	{0x2A, 0x1C, 0x7F, 0x1C, 0x2A}, // *
	{0x08, 0x08, 0x3E, 0x08, 0x08}, // +
	{0x00, 0x80, 0x70, 0x30, 0x00}, // ,
	{0x08, 0x08, 0x08, 0x08, 0x08}, // -
	{0x00, 0x00, 0x60, 0x60, 0x00}, // .
	{0x20, 0x10, 0x08, 0x04, 0x02}, // /
	{0x3E, 0x51, 0x49, 0x45, 0x3E}, // 0
	{0x00, 0x42, 0x7F, 0x40, 0x00}, // 1
	{0x72, 0x49, 0x49, 0x49, 0x46}, // 2
	{0x21, 0x41, 0x49, 0x4D, 0x33}, // 3
	{0x18, 0x14, 0x12, 0x7F, 0x10}, // 4
	{0x27, 0x45, 0x45, 0x45, 0x39}, // 5
	{0x3C, 0x4A, 0x49, 0x49, 0x31}, // 6
	{0x41, 0x21, 0x11, 0x09, 0x07}, // 7
	{0x36, 0x49, 0x49, 0x49, 0x36}, // 8
	{0x46, 0x49, 0x49, 0x29, 0x1E}, // 9
	{0x00, 0x00, 0x14, 0x00, 0x00}, // :
	{0x00, 0x40, 0x34, 0x00, 0x00}, // ;
	{0x00, 0x08, 0x14, 0x22, 0x41}, // <
	{0x14, 0x14, 0x14, 0x14, 0x14}, // =
	{0x00, 0x41, 0x22, 0x14, 0x08}, // >
	{0x02, 0x01, 0x59, 0x09, 0x06}, // ?
	{0x3E, 0x41, 0x5D, 0x59, 0x4E}, // @
	{0x7C, 0x12, 0x11, 0x12, 0x7C}, // A
	{0x7F, 0x49, 0x49, 0x49, 0x36}, // B
	{0x3E, 0x41, 0x41, 0x41, 0x22}, // C
	{0x7F, 0x41, 0x41, 0x41, 0x3E}, // D
	{0x7F, 0x49, 0x49, 0x49, 0x41}, // E
	{0x7F, 0x09, 0x09, 0x09, 0x01}, // F
	{0x3E, 0x41, 0x41, 0x51, 0x73}, // G
	{0x7F, 0x08, 0x08, 0x08, 0x7F}, // H
	{0x00, 0x41, 0x7F, 0x41, 0x00}, // I
	{0x20, 0x40, 0x41, 0x3F, 0x01}, // J
	{0x7F, 0x08, 0x14, 0x22, 0x41}, // K
	{0x7F, 0x40, 0x40, 0x40, 0x40}, // L
	{0x7F, 0x02, 0x1C, 0x02, 0x7F}, // M
	{0x7F, 0x04, 0x08, 0x10, 0x7F}, // N
	{0x3E, 0x41, 0x41, 0x41, 0x3E}, // O
	{0x7F, 0x09, 0x09, 0x09, 0x06}, // P
	{0x3E, 0x41, 0x51, 0x21, 0x5E}, // Q
	{0x7F, 0x09, 0x19, 0x29, 0x46}, // R
	{0x26, 0x49, 0x49, 0x49, 0x32}, // S
	{0x03, 0x01, 0x7F, 0x01, 0x03}, // T
	{0x3F, 0x40, 0x40, 0x40, 0x3F}, // U
	{0x1F, 0x20, 0x40, 0x20, 0x1F}, // V
	{0x3F, 0x40, 0x38, 0x40, 0x3F}, // W
	{0x63, 0x14, 0x08, 0x14, 0x63}, // X
	{0x03, 0x04, 0x78, 0x04, 0x03}, // Y
	{0x61, 0x59, 0x49, 0x4D, 0x43}, // Z
	{0x00, 0x7F, 0x41, 0x41, 0x41}, // [
	{0x02, 0x04, 0x08, 0x10, 0x20}, // backslash
	{0x00, 0x41, 0x41, 0x41, 0x7F}, // ]
	{0x04, 0x02, 0x01, 0x02, 0x04}, // ^
	{0x40, 0x40, 0x40, 0x40, 0x40}, // _
	{0x00, 0x03, 0x07, 0x08, 0x00}, // `
	{0x20, 0x54, 0x54, 0x78, 0x40}, // a
	{0x7F, 0x28, 0x44, 0x44, 0x38}, // b
	{0x38, 0x44, 0x44, 0x44, 0x28}, // c
	{0x38, 0x44, 0x44, 0x28, 0x7F}, // d
	{0x38, 0x54, 0x54, 0x54, 0x18}, // e
	{0x00, 0x08, 0x7E, 0x09, 0x02}, // f
	{0x18, 0xA4, 0xA4, 0x9C, 0x78}, // g
	{0x7F, 0x08, 0x04, 0x04, 0x78}, // h
	{0x00, 0x44, 0x7D, 0x40, 0x00}, // i
	{0x20, 0x40, 0x40, 0x3D, 0x00}, // j
	{0x7F, 0x10, 0x28, 0x44, 0x00}, // k
	{0x00, 0x41, 0x7F, 0x40, 0x00}, // l
	{0x7C, 0x04, 0x78, 0x04, 0x78}, // m
	{0x7C, 0x08, 0x04, 0x04, 0x78}, // n
	{0x38, 0x44, 0x44, 0x44, 0x38}, // o
	{0xFC, 0x18, 0x24, 0x24, 0x18}, // p
	{0x18, 0x24, 0x24, 0x18, 0xFC}, // q
	{0x7C, 0x08, 0x04, 0x04, 0x08}, // r
	{0x48, 0x54, 0x54, 0x54, 0x24}, // s
	{0x04, 0x04, 0x3F, 0x44, 0x24}, // t
	{0x3C, 0x40, 0x40, 0x20, 0x7C}, // u
	{0x1C, 0x20, 0x40, 0x20, 0x1C}, // v
	{0x3C, 0x40, 0x30, 0x40, 0x3C}, // w
	{0x44, 0x28, 0x10, 0x28, 0x44}, // x
	{0x4C, 0x90, 0x90, 0x90, 0x7C}, // y
	{0x44, 0x64, 0x54, 0x4C, 0x44}, // z
	{0x00, 0x08, 0x36, 0x41, 0x00}, // {
	{0x00, 0x00, 0x77, 0x00, 0x00}, // |
	{0x00, 0x41, 0x36, 0x08, 0x00}, // }
	{0x02, 0x01, 0x02, 0x04, 0x02}, // ~
}
